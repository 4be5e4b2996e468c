"""The fixed, reviewed inference program the operator's driver runs on the three compute parties (encrypted env).

Built with TF-Encrypted 0.9.1's ABY3 (ring 2**64, 16 fractional bits, exact ReLU by a boolean carry
circuit). Every tensor that carries data is a replicated share held by server0-2; the driver's own
device only holds the nonce counter and receives one dummy number per party and call.

* ``load(id)``: each party takes its share pair of every weight array from its own gateway (uploaded by
  the model owner) into TF variables on its own device. No weight ever exists in plaintext here.
* ``predict[n](id)``: each party takes its share pair of the client's batch from its own gateway;
  every input column is clamped to the model's public input box (``bounds``; the model owner certified that no
  truncation can fail on that box, whatever a client sends); the MLP runs on shares (matmul with reshare + truncation, ABY3 ReLU); the result is **re-randomised by a
  fresh zero-sharing** and each party hands only its own additive share to its own gateway, which gives it
  only to the submitting certificate. Output policy: ``logit`` (default) or ``label`` (the sign bit,
  computed privately; boolean shares).
* No reconstruction / reveal anywhere (``tests/encrypted_serving/test_program_local.py`` hooks them).

Fresh randomness: TFE seeds its correlated randomness with ``key + nonce`` where the nonce is a Python
int fixed at trace time; ``FreshNonceABY3`` shifts the keys inside the graph by a counter variable that the
driver bumps before every call, so a traced graph never replays masks (the keys themselves come from
libsodium on the parties; the client contributes no randomness to the parties' masks).
"""
from __future__ import annotations

import json
import weakref
from typing import Dict, List

import numpy as np
import tensorflow as tf
import tf_encrypted as tfe
from tensorflow.python.ops import gen_script_ops
from tf_encrypted.protocol import ABY3
from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor
from tf_encrypted.protocol.aby3.aby3 import ShareType

from encrypted_serving import bounds
from encrypted_serving import fastops
from encrypted_serving import model_format as mf

PARTIES = ("server0", "server1", "server2")
DRIVER = "driver"
WARMUP_ID = "__warmup__"


class FreshNonceABY3(ABY3):
    """ABY3 whose traced graphs draw fresh masks per call (see module doc)."""

    _call_counter = None

    def enable_fresh_nonces(self, device: str):
        with tf.device(device):
            self._call_counter = tf.Variable(0, dtype=tf.int32, trainable=False, name="nonce-call-counter")

    def bump_nonces(self):
        if self._call_counter is not None:
            self._call_counter.assign_add(1)

    def _shifted(self, name, keys):
        if self._call_counter is None or tf.executing_eagerly():
            return keys
        graph = tf.compat.v1.get_default_graph()
        cache = self.__dict__.setdefault("_shifted_cache", weakref.WeakKeyDictionary()).setdefault(graph, {})
        if name not in cache:
            with tf.device(self._call_counter.device):
                call = tf.reshape(self._call_counter.read_value(), [1])
                vec = tf.concat([tf.zeros([1], tf.int32), call, tf.zeros([6], tf.int32)], 0)
            out = []
            for i, row in enumerate(keys):
                with tf.device(self.servers[i].device_name):
                    out.append([None if k is None else k + vec for k in row])
            cache[name] = out
        return cache[name]

    def pairwise_keys(self):
        return self._shifted("pairwise", super().pairwise_keys())

    def b2a_keys_1(self):
        return self._shifted("b2a1", super().b2a_keys_1())

    def b2a_keys_2(self):
        return self._shifted("b2a2", super().b2a_keys_2())


def py_bridge(token: str, inputs, tout):
    """Call one of the worker's registered bridge functions (runs in the process of the current device)."""
    return gen_script_ops.py_func(input=inputs, token=token, Tout=tout)


class Program:
    """Everything the driver runs. Create after tfe.set_config(...) with players server0-2 and driver."""

    def __init__(self, model: dict, output: str = "logit", fast_kernels: bool = True):
        if output not in ("logit", "label"):
            raise ValueError("output must be 'logit' or 'label'")
        if fast_kernels:
            fastops.install()
        self.model, self.output = mf.validate_config(model), output
        self.low, self.high = bounds.box_of(self.model)      # public: clamp every input column to it
        cfg = tfe.get_config()
        self.devices = [cfg.get_player(p).device_name for p in PARTIES]
        self.driver_device = cfg.get_player(DRIVER).device_name
        self.prot = FreshNonceABY3()
        tfe.set_protocol(self.prot)
        self.prot.enable_fresh_nonces(self.driver_device)
        self.factory = self.prot.default_factory
        self.shapes = []   # [(key, shape)] in model order
        fan = self.model["input_dim"]
        for i, layer in enumerate(self.model["layers"]):
            self.shapes += [(mf.kernel_key(i), [fan, layer["units"]]), (mf.bias_key(i), [layer["units"]])]
            fan = layer["units"]
        # vars[i][key] = (share s_i, share s_{i+1}) of that weight, on party i's device
        self.vars: List[Dict[str, tuple]] = []
        for i, dev in enumerate(self.devices):
            with tf.device(dev):
                self.vars.append({k: (tf.Variable(tf.zeros(s, tf.int64), trainable=False),
                                      tf.Variable(tf.zeros(s, tf.int64), trainable=False)) for k, s in self.shapes})
        self._predict = {}
        self.load = tf.function(self._load, autograph=False)
        self.wait = tf.function(self._wait, autograph=False)
        self.fail = tf.function(self._fail, autograph=False)

    def token(self, name: str, party: int) -> str:
        """The bridge token on party `party`'s device (the same name in every worker process)."""
        return name

    # ------------------------------------------------------------------ bridge-only programs
    def _wait(self, since, model_loaded, timeout_ms):
        # three independent bridge calls (no control edges between them): each party's long poll blocks in its
        # gateway until a submission arrives there or timeout_ms passes
        out = []
        for i, dev in enumerate(self.devices):
            with tf.device(dev):
                out.append(py_bridge(self.token("privtrain_wait", i), [since[i], timeout_ms, model_loaded],
                                     [tf.string])[0])
        return tf.stack(out)

    def _fail(self, rid, message):
        out = []
        for i, dev in enumerate(self.devices):
            with tf.device(dev):
                out.append(py_bridge(self.token("privtrain_fail", i), [rid, message], [tf.int64])[0])
        return tf.stack(out)

    def _load(self, rid):
        done = []
        for i, dev in enumerate(self.devices):
            with tf.device(dev):
                parts = py_bridge(self.token("privtrain_take", i), [rid, tf.constant("model"), tf.constant(0, tf.int64)],
                                  [tf.int64] * (2 * len(self.shapes)))
                ops = []
                for j, (key, shape) in enumerate(self.shapes):
                    va, vb = self.vars[i][key]
                    ops.append(va.assign(tf.reshape(parts[2 * j], shape)))
                    ops.append(vb.assign(tf.reshape(parts[2 * j + 1], shape)))
                with tf.control_dependencies(ops):
                    zero = tf.zeros([0], tf.int64)
                    done.append(py_bridge(self.token("privtrain_put", i), [rid, tf.constant("model-loaded"), zero], [tf.int64])[0])
        return tf.stack(done)

    # ------------------------------------------------------------------ the inference program
    def _private(self, pairs, is_scaled=True) -> ABY3PrivateTensor:
        shares = []
        for i, (a, b) in enumerate(pairs):
            with tf.device(self.devices[i]):
                shares.append([self.factory.tensor(a), self.factory.tensor(b)])
        return ABY3PrivateTensor(self.prot, shares, is_scaled, ShareType.ARITHMETIC)

    def weights(self):
        out = []
        for key, _ in self.shapes:
            pairs = []
            for i, dev in enumerate(self.devices):
                with tf.device(dev):
                    va, vb = self.vars[i][key]
                    pairs.append((va.read_value(), vb.read_value()))
            out.append(self._private(pairs))
        return [(out[j], out[j + 1]) for j in range(0, len(out), 2)]

    def clamp(self, x: ABY3PrivateTensor) -> ABY3PrivateTensor:
        """min(max(x, low), high) per column, exact for any ring value (low <= 0 <= high, public), with two sign
        tests instead of three ReLUs (each sign test is ABY3's 64-bit carry circuit, the clamp's whole cost):
        c = [x < 0] (boolean share); |x| = x - 2 x c; t = high where x >= 0, -low where x < 0 (public values
        selected by c: local arithmetic); e = relu(|x| - t) is by how much x leaves the box on its side;
        result = x - e where x >= 0, x + e where x < 0, i.e. x - e + 2 e c. No truncation; nothing overflows for
        |x| < 2**63 - 2**21 and the wrap-arounds of x = -2**63 and -2**63 + 1 land at `low` as well (tested)."""
        prot = self.prot
        n, d = int(x.shape[0]), int(x.shape[1])
        low = np.broadcast_to(np.asarray(self.low, np.float64), (n, d))
        high = np.broadcast_to(np.asarray(self.high, np.float64), (n, d))
        c = prot.msb(x)                                        # 1 where x < 0
        xc = prot.mul_ab(x, c)
        absx = prot.sub(x, prot.add(xc, xc))
        t = prot.select(c, high, -low)                         # public per column, chosen by the private sign
        e = prot.relu(prot.sub(absx, t))
        ec = prot.mul_ab(e, c)
        return prot.add(prot.sub(x, e), prot.add(ec, ec))

    def forward(self, x: ABY3PrivateTensor) -> ABY3PrivateTensor:
        prot, h = self.prot, self.clamp(x)
        for (w, b), layer in zip(self.weights(), self.model["layers"]):
            h = prot.add(prot.matmul(h, w), b)
            if layer["activation"] == "relu":
                h = prot.relu(h)
        return h

    def output_shares(self, h: ABY3PrivateTensor, n: int):
        """One fresh additive (logit) or XOR (label) share per party, on that party's device."""
        prot = self.prot
        if self.output == "logit":
            z = prot._gen_zero_sharing([n, 1], share_type=ShareType.ARITHMETIC)
            out = []
            for i, dev in enumerate(self.devices):
                with tf.device(dev):
                    out.append(tf.reshape((h.unwrapped[i][0] + z[i]).value, [n]))
            return out
        bit = prot.msb(h)          # boolean sharing of (logit < 0)
        z = prot._gen_zero_sharing([n, 1], share_type=ShareType.BOOLEAN)
        out = []
        for i, dev in enumerate(self.devices):
            with tf.device(dev):
                b = tf.cast(bit.unwrapped[i][0].value, tf.int64)
                out.append(tf.reshape(tf.bitwise.bitwise_xor(b, tf.bitwise.bitwise_and(z[i].value, 1)), [n]))
        return out

    def _predict_fn(self, n: int):
        d = self.model["input_dim"]

        def predict(rid):
            pairs = []
            for i, dev in enumerate(self.devices):
                with tf.device(dev):
                    a, b = py_bridge(self.token("privtrain_take", i), [rid, tf.constant("predict"), tf.constant(n, tf.int64)],
                                     [tf.int64, tf.int64])
                    pairs.append((tf.reshape(a, [n, d]), tf.reshape(b, [n, d])))
            h = self.forward(self._private(pairs))
            done = []
            for i, share in enumerate(self.output_shares(h, n)):
                with tf.device(self.devices[i]):
                    done.append(py_bridge(self.token("privtrain_put", i), [rid, tf.constant(self.output), share], [tf.int64])[0])
            return tf.stack(done)

        return tf.function(predict, autograph=False)

    def predict(self, n: int):
        """The traced program for batch size n (traced once, reused; fresh masks per call)."""
        fn = self._predict.get(n)
        if fn is None:
            fn = self._predict[n] = self._predict_fn(n)
        return fn

    def run_predict(self, rid: str, n: int):
        self.prot.bump_nonces()
        with tf.device(self.driver_device):
            r = tf.constant(rid)
        return self.predict(n)(r).numpy()

    def run_load(self, rid: str):
        with tf.device(self.driver_device):
            r = tf.constant(rid)
        return self.load(r).numpy()

    def run_wait(self, since, model_loaded: bool, timeout_ms: int = 200):
        with tf.device(self.driver_device):
            s = [tf.constant(int(v), tf.int64) for v in since]
            m = tf.constant(bool(model_loaded))
            t = tf.constant(int(timeout_ms), tf.int64)
        return [json.loads(x.decode()) for x in self.wait(s, m, t).numpy()]

    def run_fail(self, rid: str, message: str):
        with tf.device(self.driver_device):
            return self.fail(tf.constant(rid), tf.constant(message[:2000])).numpy()
