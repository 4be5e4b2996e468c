"""simulations/bench_encrypted.py starts no unauthenticated cluster (issue 19, item 5).

The old benchmark started the legacy client-driven TF cluster (encrypted_serving.launcher) on 127.0.0.1 as
root with no authentication: during a run a local process read /etc/shadow through it (the same attack as
test_gateway_service's attack a, which still reads the legacy cluster's weights). The benchmark now compares the
served design with plaintext only, and the served design only inside its private network namespace.
"""
import ast
import os

from conftest import REPO

LEGACY = {"launcher", "engine", "client", "player", "cluster"}   # the client-driven design's modules
BENCH = os.path.join(REPO, "simulations", "bench_encrypted.py")


def _tree():
    return ast.parse(open(BENCH).read(), BENCH)


def test_the_benchmark_uses_no_legacy_cluster_module():
    used = set()
    for node in ast.walk(_tree()):
        if isinstance(node, ast.ImportFrom) and node.module == "encrypted_serving":
            used |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("encrypted_serving."):
            used.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            used |= {a.name.split(".")[1] for a in node.names if a.name.startswith("encrypted_serving.")}
    assert not used & LEGACY, used & LEGACY
    names = {n.attr for n in ast.walk(_tree()) if isinstance(n, ast.Attribute)}
    assert "EncryptedService" not in names and "EncryptedPredictor" not in names


def test_the_served_design_runs_only_in_its_network_namespace():
    calls = [n for n in ast.walk(_tree()) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "GatewayService"]
    assert calls
    for call in calls:
        iso = {k.arg: k.value for k in call.keywords}.get("isolation")
        assert isinstance(iso, ast.Constant) and iso.value == "netns", ast.dump(call)
