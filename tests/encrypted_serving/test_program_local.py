"""The fixed party program, in one process (encrypted env only: needs tf-encrypted 0.9.1).

The workers' bridge functions are registered here against an in-memory fake gateway, and TFE's
reconstruction / reveal are hooked to fail: the traced load and predict programs must never call them
(no party device ever holds a weight or an input in the clear), must match numpy, and must hand out fresh
output shares for identical requests.
"""
import numpy as np
import pytest

pytest.importorskip("tf_encrypted")

import tensorflow as tf  # noqa: E402
import tf_encrypted as tfe  # noqa: E402

from encrypted_serving import bounds  # noqa: E402
from encrypted_serving import model_format as mf  # noqa: E402
from encrypted_serving import ring  # noqa: E402
from encrypted_serving import worker  # noqa: E402

from conftest import random_mlp  # noqa: E402


class FakeGateway:
    """What the gateways hold, per party: submitted share pairs by id; outputs put back by the program."""

    def __init__(self, party):
        self.party, self.inputs, self.outputs = party, {}, {}

    def call(self, header, arrays=None, timeout=None):
        op, rid = header["op"], header.get("id")
        if op == "take":
            return {"ok": True}, self.inputs.pop(rid)
        if op == "put":
            self.outputs[rid] = (header["output"], arrays["share"].copy())
            return {"ok": True}, {}
        if op == "wait":
            return {"seq": 0, "ready": []}, {}
        return {"ok": True}, {}


@pytest.fixture(scope="module")
def program_env():
    from encrypted_serving import program as prog
    players = ["server0", "server1", "server2", "driver"]
    tfe.set_config(tfe.LocalConfig(players))
    config, weights = random_mlp(6, hidden=(5, 4), seed=1)
    spec = [{"name": "f%d" % i, "kind": "numeric", "mean": 0.0, "std": 1.0, "log1p": False, "clip": [-2.0, 3.0]}
            for i in range(6)]
    config = bounds.attach(config, weights, spec)     # the public input box + the owner's certificate
    keys = [k for i in range(len(config["layers"])) for k in (mf.kernel_key(i), mf.bias_key(i))]
    # One process stands in for the three workers (LocalConfig puts every player on one CPU): each party's
    # bridge functions are registered under a per-party token, each talking to its own fake gateway.
    gateways = [FakeGateway(p) for p in players[:3]]
    state = {}
    keep = []
    for i, g in enumerate(gateways):
        fns = worker.make_functions(g, keys, config["input_dim"])
        keep.append(worker.register({"%s_%d" % (t, i): f for t, f in fns.items()}))

    class LocalProgram(prog.Program):
        def token(self, name, party):
            return "%s_%d" % (name, party)
    calls = []
    originals = {}
    prot_cls = prog.FreshNonceABY3
    for name in ("_reconstruct", "reveal", "_decode"):
        originals[name] = getattr(prot_cls, name)

        def trap(self, *a, _name=name, **k):
            calls.append(_name)
            raise AssertionError("the party program called %s" % _name)
        setattr(prot_cls, name, trap)
    try:
        p = LocalProgram(config, "logit")
        yield p, config, weights, gateways, state
    finally:
        for name, fn in originals.items():
            setattr(prot_cls, name, fn)
        del keep
        tfe.set_protocol(None)
    assert not calls


def _submit(gateways, rid, arrays_per_party):
    for g, arrays in zip(gateways, arrays_per_party):
        g.inputs[rid] = arrays


def test_program_loads_shares_and_predicts_without_any_reveal(program_env):
    p, config, weights, gateways, state = program_env
    per_party = [{}, {}, {}]
    for key, w in weights.items():
        for i, (a, b) in enumerate(ring.share_for_parties(w)):
            per_party[i][key + "/a"], per_party[i][key + "/b"] = a, b
    _submit(gateways, "m", per_party)
    state["party"] = 0
    p.run_load("m")
    x = np.random.default_rng(0).normal(size=(3, config["input_dim"]))
    outs = []
    for rid in ("r1", "r2"):
        _submit(gateways, rid, [{"a": a, "b": b} for a, b in ring.share_for_parties(x)])
        p.run_predict(rid, 3)
        shares = [g.outputs[rid][1] for g in gateways]
        outs.append(shares)
        np.testing.assert_allclose(ring.decode(ring.combine(shares)),
                                   mf.forward_logits(config, weights, bounds.clamp(x, *bounds.box_of(config))),
                                   atol=2e-3)
    for i in range(3):   # identical inputs, fresh output shares on every party
        assert not np.array_equal(outs[0][i], outs[1][i])
    assert p.predict(3).experimental_get_tracing_count() == 1


def test_traced_program_only_bridges_on_party_devices(program_env):
    p = program_env[0]
    graph = p.predict(3).get_concrete_function(tf.TensorSpec([], tf.string)).graph
    bridges = [op for op in graph.get_operations() if op.type == "PyFunc"]
    tokens = sorted(op.get_attr("token").decode() for op in bridges)
    assert tokens == ["privtrain_put_%d" % i for i in range(3)] + ["privtrain_take_%d" % i for i in range(3)]
    # each put receives a share computed on its own party's device (TFE places per server)
    for op in bridges:
        assert op.device, op.name


def test_label_output_policy_gives_only_label_shares(program_env):
    p, config, weights, gateways, _ = program_env
    lp = type(p)(config, "label")
    per_party = [{}, {}, {}]
    for key, w in weights.items():
        for i, (a, b) in enumerate(ring.share_for_parties(w)):
            per_party[i][key + "/a"], per_party[i][key + "/b"] = a, b
    _submit(gateways, "m2", per_party)
    lp.run_load("m2")
    x = np.random.default_rng(5).normal(size=(3, config["input_dim"]))
    _submit(gateways, "l1", [{"a": a, "b": b} for a, b in ring.share_for_parties(x)])
    lp.run_predict("l1", 3)
    kinds = {g.outputs["l1"][0] for g in gateways}
    shares = [g.outputs["l1"][1] for g in gateways]
    assert kinds == {"label"}
    assert all(set(np.unique(s)) <= {0, 1} for s in shares)      # single bits, nothing of the logit
    logits = mf.forward_logits(config, weights, x)
    np.testing.assert_array_equal(1 - ring.combine_bits(shares), (logits >= 0).astype(int))


def _load(p, gateways, weights, rid):
    per_party = [{}, {}, {}]
    for key, w in weights.items():
        for i, (a, b) in enumerate(ring.share_for_parties(w)):
            per_party[i][key + "/a"], per_party[i][key + "/b"] = a, b
    _submit(gateways, rid, per_party)
    p.run_load(rid)


def test_huge_inputs_are_clamped_inside_the_mpc(program_env):
    """Issue 19 item 2: a client may share any ring value (up to about -2**63): the program clamps every column to
    the public box before the first product, so the output is exactly that of the clamped input (no truncation
    failure whose rate would depend on the weights)."""
    p, config, weights, gateways, _ = program_env
    _load(p, gateways, weights, "m-huge")
    low, high = bounds.box_of(config)
    ring_x = np.array([[2 ** 62, -(2 ** 62), 2 ** 50, -(2 ** 50), 5 * 2 ** 16, -(2 ** 16)],
                       [-(2 ** 63) + 1, 2 ** 63 - 1, 0, 2 ** 40, -(2 ** 40), 3 * 2 ** 15]], dtype=np.int64)
    x = ring.decode(ring_x)
    _submit(gateways, "huge", [{"a": a, "b": b} for a, b in ring.replicate(ring.split(ring_x))])
    p.run_predict("huge", 2)
    got = ring.decode(ring.combine([g.outputs["huge"][1] for g in gateways]))
    want = mf.forward_logits(config, weights, bounds.clamp(x, low, high))
    print("huge inputs: MPC", got, "plaintext on the clamped input", want,
          "unclamped", mf.forward_logits(config, weights, x))
    np.testing.assert_allclose(got, want, atol=2e-3)


class MergingGateway(FakeGateway):
    """FakeGateway plus the gateway's merged take/put (`ids`): rows concatenated, output split per id."""

    def call(self, header, arrays=None, timeout=None):
        if "ids" not in header:
            return super().call(header, arrays, timeout)
        if header["op"] == "take":
            parts = [self.inputs.pop(r) for r in header["ids"]]
            return {"ok": True, "rows": [len(p["a"]) for p in parts]}, {
                "a": np.concatenate([p["a"] for p in parts]), "b": np.concatenate([p["b"] for p in parts])}
        at = 0
        for rid, n in zip(header["ids"], header["rows"]):
            self.outputs[rid] = (header["output"], arrays["share"][at:at + n].copy())
            at += n
        return {"ok": True}, {}


def test_merged_requests_run_in_one_program_and_each_gets_its_own_rows(program_env):
    """Cross-request batching: two requests (1 and 2 rows) in one run of the 4-row program, padded with zero
    shares; each id gets exactly its own rows' output shares (nothing for the padding), matching numpy."""
    p, config, weights, gateways, _ = program_env
    merging = [MergingGateway(g.party) for g in gateways]
    keys = [k for i in range(len(config["layers"])) for k in (mf.kernel_key(i), mf.bias_key(i))]
    from tensorflow.python.ops import script_ops
    saved = {t: script_ops._py_funcs._funcs[t] for t in list(script_ops._py_funcs._funcs) if t.startswith("privtrain_")}
    keep = [worker.register({"%s_%d" % (t, i): f for t, f in worker.make_functions(g, keys, config["input_dim"]).items()})
            for i, g in enumerate(merging)]
    _load(p, merging, weights, "m-merge")
    rng = np.random.default_rng(7)
    xa, xb = rng.normal(size=(1, config["input_dim"])), rng.normal(size=(2, config["input_dim"]))
    _submit(merging, "ra", [{"a": a, "b": b} for a, b in ring.share_for_parties(xa)])
    _submit(merging, "rb", [{"a": a, "b": b} for a, b in ring.share_for_parties(xb)])
    p.run_predict("ra,rb", 4)
    box = bounds.box_of(config)
    for rid, x in (("ra", xa), ("rb", xb)):
        shares = [g.outputs[rid][1] for g in merging]
        assert all(s.shape == (len(x),) for s in shares)
        np.testing.assert_allclose(ring.decode(ring.combine(shares)),
                                   mf.forward_logits(config, weights, bounds.clamp(x, *box)), atol=2e-3)
    worker.register(saved)       # back to the module's gateways for the other tests
    del keep
