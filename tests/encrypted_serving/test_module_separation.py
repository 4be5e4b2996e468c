"""The served design keeps the two environments apart: the platform side (service, cli, share_client) and
the pure modules import no TF at all; the party side (gateway, worker, driver, program) imports nothing of
the platform's packages (pipeline, serving, dp_training, federated, tfx, and the shared core/)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLATFORM_PKGS = ("pipeline", "serving", "dp_training", "federated", "tfx", "tensorflow_transform")


def _loaded(modules, python=sys.executable):
    code = ("import sys; [__import__(m) for m in %r]; "
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))" % (modules,))
    out = subprocess.run([python, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_clients_gateways_and_service_import_no_tensorflow():
    mods = ["encrypted_serving.service", "encrypted_serving.cli", "encrypted_serving.share_client",
            "encrypted_serving.gateway", "encrypted_serving.certs", "encrypted_serving.ring", "encrypted_serving.parties"]
    loaded = _loaded(mods)
    assert "tensorflow" not in loaded and "tf_encrypted" not in loaded
    assert not loaded & set(PLATFORM_PKGS), loaded & set(PLATFORM_PKGS)


def test_party_side_imports_nothing_of_the_platform():
    from encrypted_serving.environment import encrypted_python
    mods = ["encrypted_serving.gateway", "encrypted_serving.worker", "encrypted_serving.driver",
            "encrypted_serving.program"]
    loaded = _loaded(mods, python=encrypted_python())
    assert "tf_encrypted" in loaded
    # the platform's shared core included: it is written for the platform env (TF 2.15), not TF 2.9
    assert not loaded & (set(PLATFORM_PKGS) | {"core"}), loaded & (set(PLATFORM_PKGS) | {"core"})
