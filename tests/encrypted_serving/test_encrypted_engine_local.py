"""In-process unit tests of engine internals (encrypted env only: needs tf-encrypted 0.9.1).

Run with the encrypted env's pytest:
    PYTHONPATH=. $(scripts/setup_env.sh encrypted)/bin/python -m pytest tests/encrypted_serving
"""
import numpy as np
import pytest

pytest.importorskip("tf_encrypted")

import tensorflow as tf  # noqa: E402
import tf_encrypted as tfe  # noqa: E402

from encrypted_serving import cluster as cl  # noqa: E402
from encrypted_serving import engine  # noqa: E402


@pytest.fixture
def local_aby3():
    tfe.set_config(tfe.LocalConfig(list(cl.PLAYERS)))
    prot = engine._ABY3()
    tfe.set_protocol(prot)
    prot.enable_fresh_nonces()
    yield prot
    tfe.set_protocol(None)


def test_traced_graph_draws_fresh_masks_per_call(local_aby3):
    prot = local_aby3

    @tf.function(autograph=False)
    def zero_share():
        a0, _, _ = prot._gen_zero_sharing([4])
        return a0.to_native()

    first = zero_share().numpy()
    assert np.array_equal(first, zero_share().numpy())        # same counter -> same mask (TFE's behaviour)
    prot.bump_nonces()
    second = zero_share().numpy()
    assert not np.array_equal(first, second)                   # bumped -> fresh mask, same graph
    assert zero_share.experimental_get_tracing_count() == 1


def test_private_mlp_matches_numpy_on_local_config(local_aby3):
    prot = local_aby3
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
    w1, b1 = rng.normal(size=(4, 1)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    W0 = prot.define_private_variable(prot.define_private_input(cl.MODEL_OWNER, lambda: tf.constant(w0)))
    B0 = prot.define_private_variable(prot.define_private_input(cl.MODEL_OWNER, lambda: tf.constant(b0)))
    W1 = prot.define_private_variable(prot.define_private_input(cl.MODEL_OWNER, lambda: tf.constant(w1)))
    B1 = prot.define_private_variable(prot.define_private_input(cl.MODEL_OWNER, lambda: tf.constant(b1)))
    client = tfe.get_config().get_player(cl.CLIENT)

    @tf.function(autograph=False)
    def f(v):
        h = prot.define_private_input(cl.CLIENT, lambda: v)
        h = prot.relu(prot.add(prot.matmul(h, W0), B0))
        h = prot.add(prot.matmul(h, W1), B1)
        return prot._decode(prot._reconstruct(h.unwrapped, client, h.share_type), h.is_scaled)

    ref = np.maximum(x @ w0 + b0, 0) @ w1 + b1
    for _ in range(2):
        prot.bump_nonces()
        np.testing.assert_allclose(f(tf.constant(x)).numpy(), ref, atol=1e-3)


@pytest.mark.slow
def test_party_stopped_mid_session_times_out(tmp_path):
    """Client already connected and model shared; a server stops answering: clear error within the timeout.

    Joins a real cluster (process-global in TF), so it runs last in its own pytest process ideally.
    """
    import os
    import signal
    import sys
    import time

    from conftest import random_mlp
    from encrypted_serving import model_format as mf
    from encrypted_serving.launcher import EncryptedService

    spec = [{"name": "f%d" % i, "kind": "numeric", "mean": 0.0, "std": 1.0, "log1p": False} for i in range(6)]
    config, weights = random_mlp(6, hidden=(4,))
    model_dir = mf.save_model(str(tmp_path / "m"), config, weights, spec)
    with EncryptedService(model_dir, run_dir=str(tmp_path / "run"), python=sys.executable) as svc:
        pred = engine.EncryptedPredictor(svc.cluster_json, timeout_s=5)
        x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
        np.testing.assert_allclose(pred.predict_logits(x), mf.forward_logits(config, weights, x), atol=1e-3)
        os.killpg(svc.pids["server1"], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(engine.PartyUnavailableError, match="not answering: server1"):
                pred.predict_logits(x)
            assert time.monotonic() - t0 < 30
        finally:
            os.killpg(svc.pids["server1"], signal.SIGCONT)


@pytest.mark.parametrize("dtype", [tf.int8, tf.int16, tf.int32, tf.int64])
def test_fast_bit_split_and_gather_is_bit_identical(dtype):
    from encrypted_serving import fastops
    info = np.iinfo(dtype.as_numpy_dtype)
    x = np.random.default_rng(0).integers(info.min, info.max, size=(50, 7), dtype=dtype.as_numpy_dtype,
                                          endpoint=True)
    x[0, :3] = [0, -1, info.min]
    native = fastops.native_bit_split_and_gather(tf.constant(x), 2).numpy()
    fast = fastops.bit_split_and_gather(tf.constant(x), 2).numpy()
    assert fast.dtype == native.dtype and fast.shape == native.shape == (2, 50, 7)
    np.testing.assert_array_equal(fast, native)
