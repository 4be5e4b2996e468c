"""SecAgg+ (federated/secagg/protocol.py): exact sums under dropouts, and attack tests against a malicious server
and colluding clients. TF-free and fast."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from federated.secagg import prg, shamir
from federated.secagg import protocol as P

BITS = 32
RING = np.uint64((1 << BITS) - 1)


def _inputs(ids, dim, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2 ** 20, dim).astype(np.uint64) for i in ids}


def _sum(x, ids):
    return sum(x[i] for i in ids) & RING


def _uniform_p(y: np.ndarray, bits: int = BITS) -> float:
    """Chi-square p-value that y is uniform on Z_{2^bits}: 64 bins of the top 6 bits and 64 of the low 6 bits."""
    top = (y >> np.uint64(bits - 6)).astype(np.int64)
    low = (y & np.uint64(63)).astype(np.int64)
    return min(stats.chisquare(np.bincount(top, minlength=64)).pvalue,
               stats.chisquare(np.bincount(low, minlength=64)).pvalue)


def _keys(clients, server):
    """AdvertiseKeys (advert, then reveal) and ShareKeys through the server: (adverts, routed shares)."""
    adverts = server.collect_adverts([c.advertise() for c in clients.values()])
    reveals = server.collect_reveals({i: c.reveal(adverts) for i, c in clients.items()})
    return adverts, server.route_shares({i: c.share_keys(reveals) for i, c in clients.items()})


def _setup(n, t, dim, degree=None):
    ids = list(range(1, n + 1))
    return ids, P.Params.new(ids, t, dim, BITS, degree), P.Identities.generate(ids)


# --------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("degree", [None, 6])
def test_sum_is_exact_without_dropouts(degree):
    ids, params, ident = _setup(12, 4 if degree else 7, 257, degree)
    x = _inputs(ids, 257)
    res = P.run_round(params, x, ident)
    assert res.u3 == ids
    np.testing.assert_array_equal(res.total, _sum(x, ids))


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_sum_is_exact_with_dropouts_up_to_the_threshold(stage):
    """n=11, k=10, t=6: up to k - t = 4 clients may drop at any stage; the sum over the clients whose masked
    input arrived is still exact (dropped clients' pairwise masks are unmasked from shares)."""
    ids, params, ident = _setup(11, 6, 300)
    x = _inputs(ids, 300, seed=stage)
    res = P.run_round(params, x, ident, drop={stage: {2, 5, 7, 9}})
    expected_in = ids if stage >= 3 else [i for i in ids if i not in {2, 5, 7, 9}]
    assert res.u3 == expected_in
    np.testing.assert_array_equal(res.total, _sum(x, expected_in))


def test_sum_is_exact_with_secagg_plus_graph_and_dropouts():
    ids, params, ident = _setup(40, 5, 100, degree=8)
    x = _inputs(ids, 100)
    res = P.run_round(params, x, ident, drop={2: {3, 17}, 4: {20}})
    assert 3 not in res.u3 and 20 in res.u3
    np.testing.assert_array_equal(res.total, _sum(x, res.u3))


def test_more_dropouts_than_the_threshold_allows_abort_the_round():
    ids, params, ident = _setup(11, 6, 50)
    with pytest.raises(P.ProtocolAbort, match="threshold 6"):
        P.run_round(params, _inputs(ids, 50), ident, drop={2: {1, 2, 3, 4, 5, 6}})


def test_threshold_at_most_half_the_neighbours_is_refused():
    with pytest.raises(ValueError, match="more than half"):
        P.Params.new(list(range(1, 11)), 4, 10, BITS)


# ------------------------------------------------------------------------------------- the server's view
def test_server_view_of_a_masked_input_is_uniform():
    """A client with a maximally structured input (all zeros); the vector the server receives passes a chi-square
    uniformity test, while the test rejects the unmasked input and a weakly masked one (power check)."""
    dim = 40_000
    ids, params, ident = _setup(5, 3, dim)
    x = {i: np.zeros(dim, np.uint64) for i in ids}
    res = P.run_round(params, x, ident)
    for i in ids:
        assert _uniform_p(res.server.masked[i]) > 1e-4
    assert _uniform_p(x[1]) < 1e-12
    weak = (np.random.default_rng(0).integers(0, 2 ** 28, dim).astype(np.uint64))   # a mask short of 4 bits
    assert _uniform_p(weak) < 1e-12


def test_server_view_of_the_encrypted_shares_is_uniform():
    """The share messages the server relays (ChaCha20-Poly1305 ciphertexts of Shamir shares) look uniform: a
    chi-square test over all their bytes, while the same test rejects the plaintext shares' byte layout."""
    ids, params, ident = _setup(40, 21, 8)
    clients = {i: P.Client(i, ident.keys[i], ident.directory, params) for i in ids}
    server = P.Server(params)
    adverts = server.collect_adverts([c.advertise() for c in clients.values()])
    reveals = server.collect_reveals({i: c.reveal(adverts) for i, c in clients.items()})
    sent = {i: c.share_keys(reveals) for i, c in clients.items()}
    blob = np.frombuffer(b"".join(ct for per in sent.values() for ct in per.values()), np.uint8)
    assert blob.size > 200_000
    assert stats.chisquare(np.bincount(blob, minlength=256)).pvalue > 1e-4
    plain = np.frombuffer(b"".join(P._id(1) + P._id(2) + (5).to_bytes(P.SHARE_BYTES, "big") * 2
                                   for _ in range(1000)), np.uint8)
    assert stats.chisquare(np.bincount(plain, minlength=256)).pvalue < 1e-12


def test_a_server_claiming_a_client_dropped_after_its_input_cannot_unmask_it():
    """The server receives y_v, then announces U3 without v to everyone: the clients reveal v's mask key shares
    (v 'dropped'), never its self-mask seed, so y_v with every pairwise mask removed is still uniform."""
    dim = 40_000
    ids, params, ident = _setup(7, 4, dim)
    v = 3
    directory = ident.directory
    clients = {i: P.Client(i, ident.keys[i], directory, params) for i in ids}
    server = P.Server(params)
    x = {i: np.zeros(dim, np.uint64) for i in ids}
    x[v] = np.arange(dim, dtype=np.uint64)   # the victim's structured input
    adverts, routes = _keys(clients, server)
    masked = {i: c.masked_input(x[i], routes[i]) for i, c in clients.items()}
    server.collect_masked(masked)
    lie = [i for i in ids if i != v]           # "v dropped"
    server.u3 = lie
    with pytest.raises(P.ProtocolAbort, match="not in the server's list"):
        clients[v].consistency(lie)
    sigs = {i: clients[i].consistency(lie) for i in lie}
    server.collect_signatures(sigs)
    responses = [clients[i].unmask(sigs) for i in lie]
    assert all(v not in r.b_shares for r in responses)          # nobody reveals v's self-mask seed
    s_shares = {r.cid: r.s_shares[v] for r in responses}
    # the server reconstructs v's mask key and strips every pairwise mask from y_v
    from cryptography.hazmat.primitives.asymmetric import x25519
    s_sk = x25519.X25519PrivateKey.from_private_bytes(shamir.to_bytes(shamir.reconstruct(s_shares, 4)))
    y = masked[v].copy()
    for j in lie:
        seed = P._kdf(s_sk.exchange(x25519.X25519PublicKey.from_public_bytes(adverts[j].s_pk)), server.session,
                      b"mask")
        m = prg.expand(seed, dim, BITS)
        y = y - m if v < j else y + m
    y &= RING
    assert not np.array_equal(y, x[v])
    assert _uniform_p(y) > 1e-4          # x_v + PRG(b_v): still uniform
    assert _uniform_p(x[v]) < 1e-12      # (the input itself is not)


def test_an_equivocating_server_fails_the_consistency_check():
    """The server shows U3 (with v) to half of v's neighbours and U3 without v to the other half, hoping to get
    b_v's shares from one half and s_sk_v's from the other. Neither half has `threshold` signatures on its list
    (beyond its own members and v), so the second half refuses, and the first half's shares are too few."""
    ids, params, ident = _setup(11, 6, 64)   # k = 10 neighbours, t = 6
    v = 1
    directory = ident.directory
    clients = {i: P.Client(i, ident.keys[i], directory, params) for i in ids}
    server = P.Server(params)
    adverts, routes = _keys(clients, server)
    for i, c in clients.items():
        c.masked_input(np.zeros(64, np.uint64), routes[i])
    group_a, group_b = [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]
    u3_a, u3_b = ids, [i for i in ids if i != v]
    sig_a = {i: clients[i].consistency(u3_a) for i in group_a + [v]}
    sig_b = {i: clients[i].consistency(u3_b) for i in group_b}
    # passing group A's signatures to group B: they are over another list
    with pytest.raises(P.ProtocolAbort, match="did not sign the U3"):
        clients[7].unmask(sig_a)
    # group B saw v dropped: only 5 signatures on its list (< t = 6)
    for i in group_b[1:]:
        with pytest.raises(P.ProtocolAbort, match="signed U3"):
            clients[i].unmask(sig_b)
    # group A (6 signatures with v's) answers: 5 shares of b_v, one fewer than the threshold
    b_v = {r.cid: r.b_shares[v] for r in (clients[i].unmask(sig_a) for i in group_a)}
    assert len(b_v) == 5
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(b_v, 6)


def test_a_client_answers_the_unmasking_request_once():
    ids, params, ident = _setup(5, 3, 8)
    clients = {i: P.Client(i, ident.keys[i], ident.directory, params) for i in ids}
    server = P.Server(params)
    adverts, routes = _keys(clients, server)
    for i, c in clients.items():
        c.masked_input(np.zeros(8, np.uint64), routes[i])
    sigs = {i: c.consistency(ids) for i, c in clients.items()}
    clients[1].unmask(sigs)
    with pytest.raises(P.ProtocolAbort, match="once"):
        clients[1].unmask(sigs)


# --------------------------------------------------------------------------------- authenticated messages
def test_a_server_substituting_a_clients_keys_is_detected():
    """Man in the middle: the server replaces client 2's public keys by its own; the signature check fails."""
    from cryptography.hazmat.primitives.asymmetric import x25519
    ids, params, ident = _setup(5, 3, 8)
    clients = {i: P.Client(i, ident.keys[i], ident.directory, params) for i in ids}
    adverts = {i: c.advertise() for i, c in clients.items()}
    fake = P._pub(x25519.X25519PrivateKey.generate())
    adverts[2] = P.Advert(2, fake, adverts[2].s_pk, adverts[2].commitment, adverts[2].signature)
    with pytest.raises(P.ProtocolAbort, match="invalid signature"):
        clients[1].reveal(adverts)


def test_adverts_of_another_round_are_refused():
    ids, params, ident = _setup(5, 3, 8)
    other = P.Params.new(ids, 3, 8, BITS)
    old = {i: P.Client(i, ident.keys[i], ident.directory, other).advertise() for i in ids}
    fresh = P.Client(1, ident.keys[1], ident.directory, params)
    old[1] = fresh.advertise()
    with pytest.raises(P.ProtocolAbort, match="invalid signature"):
        fresh.reveal(old)


def test_a_tampered_share_ciphertext_is_refused():
    ids, params, ident = _setup(5, 3, 8)
    clients = {i: P.Client(i, ident.keys[i], ident.directory, params) for i in ids}
    server = P.Server(params)
    adverts, routes = _keys(clients, server)
    ct = bytearray(routes[1][2])
    ct[10] ^= 1
    routes[1][2] = bytes(ct)
    with pytest.raises(P.ProtocolAbort, match="failed authentication"):
        clients[1].masked_input(np.zeros(8, np.uint64), routes[1])


# ------------------------------------------------------------------------------------ colluding clients
def test_fewer_than_threshold_colluding_clients_learn_nothing():
    """t - 1 colluding neighbours of v pool v's shares and their own pairwise seeds with v. Their shares of b_v
    are consistent with every possible secret (Shamir), and y_v minus every mask they know is uniform."""
    dim = 40_000
    ids, params, ident = _setup(7, 4, dim)   # k = 6, t = 4: 3 colluders
    v, colluders = 1, [2, 3, 4]
    directory = ident.directory
    clients = {i: P.Client(i, ident.keys[i], directory, params) for i in ids}
    server = P.Server(params)
    adverts, routes = _keys(clients, server)
    x = {i: np.zeros(dim, np.uint64) for i in ids}
    x[v] = np.arange(dim, dtype=np.uint64)
    y_v = clients[v].masked_input(x[v], routes[v])
    for c in colluders:
        clients[c].masked_input(x[c], routes[c])
    pooled = {c: clients[c]._held_b[v] for c in colluders}
    # every candidate secret fits the pooled shares: interpolating them with (0, s) for any s gives a polynomial
    for s in (0, 1, 2 ** 255, shamir.PRIME - 1):
        # a degree-3 polynomial through the 3 pooled shares and (0, s) exists for every s: it reproduces s
        assert shamir.reconstruct({**pooled, 0: s}, 4) == s
    with pytest.raises(shamir.ShamirError):
        shamir.reconstruct(pooled, 4)
    y = y_v.copy()
    for c in colluders:   # remove the pairwise masks the colluders share with v
        m = prg.expand(clients[c]._mask_seed(v), dim, BITS)
        y = y - m if v < c else y + m
    y &= RING
    assert _uniform_p(y) > 1e-4


def test_shamir_threshold_shares_reconstruct_and_fewer_are_uniform():
    secret = 123456789
    sh = shamir.share(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.reconstruct({k: sh[k] for k in (1, 4, 5)}, 3) == secret
    # two shares (t - 1) of secret 0 and of secret 2^256: their top bytes are uniform in both cases
    for s in (0, 2 ** 256):
        tops = np.array([shamir.share(s, 3, [1, 2, 3])[1] >> 513 for _ in range(4000)])
        assert stats.chisquare(np.bincount(tops, minlength=256)).pvalue > 1e-4


def test_clients_refuse_to_unmask_a_sum_of_fewer_inputs_than_the_noise_floor():
    """Distributed DP needs at least min_inputs noise shares in a released sum: a server that drops clients
    from U3 to release a smaller (less noisy) sum is refused by the clients themselves."""
    ids = list(range(1, 9))
    params = P.Params.new(ids, 5, 8, BITS, min_inputs=7)
    ident = P.Identities.generate(ids)
    clients = {i: P.Client(i, ident.keys[i], ident.directory, params) for i in ids}
    server = P.Server(params)
    adverts, routes = _keys(clients, server)
    for i, c in clients.items():
        c.masked_input(np.zeros(8, np.uint64), routes[i])
    with pytest.raises(P.ProtocolAbort, match="fewer than the 7"):
        clients[1].consistency(ids[:6])
    with pytest.raises(P.ProtocolAbort, match="fewer than the 7"):
        P.run_round(params, {i: np.zeros(8, np.uint64) for i in ids}, ident, drop={2: {7, 8}})


def test_clients_in_their_own_processes_give_the_exact_sum_and_are_stopped():
    """--worker-processes: the clients' long-term keys are made in 2 client processes (only public keys leave
    them), the sum with dropouts is exact, and the processes are gone after the context manager."""
    import psutil

    from federated.secagg.processes import ProcessClients

    ids = list(range(1, 10))
    x = _inputs(ids, 64)
    with ProcessClients(ids, processes=2) as pool:
        pids = pool.pids()
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        for _ in range(2):   # two rounds on the same processes
            params = P.Params.new(ids, 5, 64, BITS)
            res = P.run_round(params, x, pool, drop={2: {4}})
            np.testing.assert_array_equal(res.total, _sum(x, [i for i in ids if i != 4]))
        assert res.bytes_per_client > 0
        with pytest.raises(P.ProtocolAbort, match="threshold"):
            P.run_round(P.Params.new(ids, 5, 64, BITS), x, pool, drop={2: {1, 2, 3, 4, 5}})
        # a client's abort in one process while the other answers leaves the pipes in step
        pool.start(P.Params.new(ids, 5, 64, BITS))
        pool.call("advertise", {1: (), 2: ()})
        with pytest.raises(P.ProtocolAbort, match="client 1: step 0 requested at step 1"):
            pool.call("advertise", {1: (), 4: ()})   # client 1 (process 0) refuses, client 4 (process 1) answers
        res = P.run_round(P.Params.new(ids, 5, 64, BITS), x, pool)
        np.testing.assert_array_equal(res.total, _sum(x, ids))
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


# ------------------------------------------------------------- attacks of the security review (A1-A4)
# Each test replays the reviewer's reproduction against the protocol as it is (the helpers below drive both the
# round layout before the fix, without a reveal step and with a server-given session, and the current one), and
# asserts that the attack fails; before the fix each of them succeeded.
_OLD_API = "session" in P.Params.__dataclass_fields__


def _params(clients, t, dim, bits, degree=None, min_inputs=1, nonce=None):
    """Round parameters with a given nonce (the server's session before the fix)."""
    import secrets
    nonce = nonce or secrets.token_bytes(32)
    if _OLD_API:
        return P.Params(nonce, tuple(clients), t, dim, bits, degree, min_inputs)
    return P.Params(tuple(clients), t, dim, bits, degree, min_inputs, nonce)


def _advertise_and_share(clients, shown, share=None):
    """AdvertiseKeys + ShareKeys as a malicious server runs them: client i sees the adverts of ``shown[i]``;
    only ``share`` (default all) send shares. Returns (adverts, {sender: {receiver: ct}})."""
    adverts = {i: c.advertise() for i, c in clients.items()}
    share = list(clients) if share is None else share
    if _OLD_API:
        return adverts, {i: clients[i].share_keys({j: adverts[j] for j in shown[i]}) for i in share}
    reveals = {i: c.reveal({j: adverts[j] for j in shown[i]}) for i, c in clients.items()}
    return adverts, {i: clients[i].share_keys({j: reveals[j] for j in shown[i]}) for i in share}


def _route(sent, ids):
    routes = {i: {} for i in ids}
    for i, m in sent.items():
        for j, ct in m.items():
            routes[j][i] = ct
    return routes


def _split_view_attack():
    """Review A1: 7 honest clients, each given its own view (cohort, threshold) under one nonce. Victim 1 sees
    neighbours {2, 3} with t = 2; clients 2, 3 see k = 3, t = 2; clients 4-7 see k = 4, t = 3. The server shows
    U3_A = {1,2,3,4,6} to 1-3 and U3_B = {4,5,6,7} to 4-7, collects b_1's shares from 2, 3 and s_sk_2, s_sk_3's
    from 4-7, and strips every mask from y_1. Returns "recovered" / "not recovered" or the abort message."""
    import secrets

    from cryptography.hazmat.primitives.asymmetric import x25519
    ident = P.Identities.generate(range(1, 8))
    nonce, dim, bits = secrets.token_bytes(32), 8, 20
    views = {1: ((1, 2, 3), 2), 2: ((1, 2, 4, 5), 2), 3: ((1, 3, 6, 7), 2), 4: ((2, 4, 5, 6, 7), 3),
             5: ((2, 4, 5, 6, 7), 3), 6: ((3, 4, 5, 6, 7), 3), 7: ((3, 4, 5, 6, 7), 3)}
    try:
        clients = {i: P.Client(i, ident.keys[i], ident.directory, _params(c, t, dim, bits, nonce=nonce))
                   for i, (c, t) in views.items()}
        x = {i: np.random.default_rng(i).integers(0, 2 ** bits, dim, dtype=np.uint64) for i in clients}
        adverts, sent = _advertise_and_share(clients, {i: v[0] for i, v in views.items()})
        routes = _route(sent, clients)
        y = {i: clients[i].masked_input(x[i], routes[i]) for i in clients}
        sig = {i: clients[i].consistency({1, 2, 3, 4, 6}) for i in (1, 2, 3)}
        sig.update({i: clients[i].consistency({4, 5, 6, 7}) for i in (4, 5, 6, 7)})
        resp = {i: clients[i].unmask({1: sig[1]}) for i in (2, 3)}
        resp.update({i: clients[i].unmask({j: sig[j] for j in (4, 5, 6, 7) if j != i}) for i in (4, 5, 6, 7)})
    except P.ProtocolAbort as e:
        return str(e)
    session = nonce if _OLD_API else clients[1].session
    b1 = shamir.to_bytes(shamir.reconstruct({2: resp[2].b_shares[1], 3: resp[3].b_shares[1]}, 2))
    rec = y[1] - prg.expand(b1, dim, bits)
    for j, holders in ((2, (4, 5)), (3, (6, 7))):
        s_j = shamir.to_bytes(shamir.reconstruct({h: resp[h].s_shares[j] for h in holders}, 2))
        shared = x25519.X25519PrivateKey.from_private_bytes(s_j).exchange(
            x25519.X25519PublicKey.from_public_bytes(adverts[1].s_pk))
        rec = rec - prg.expand(P._kdf(shared, session, b"mask"), dim, bits)
    rec &= prg.ring_mask(bits)
    return "recovered client 1's input exactly" if np.array_equal(rec, x[1]) else "not recovered"


def test_a_server_splitting_the_clients_views_cannot_recover_an_honest_clients_input():
    """Review A1: every signature covers H(params), so clients given different parameters refuse each other's
    adverts (before the fix the server recovered client 1's input exactly, from honest clients only)."""
    outcome = _split_view_attack()
    assert "invalid signature (forged, or signed for other round parameters)" in outcome, outcome


@pytest.mark.parametrize("padding", ["invented ids", "clients that dropped after advertising"])
def test_a_server_padding_u3_cannot_release_a_sum_below_the_noise_floor(padding):
    """Review A2: 10 clients, t = 5, noise floor 9. The server keeps 6 masked inputs and shows U3 = those 6 plus
    3 padding ids, so that every client's len(U3) >= 9 check passes. Now U3 must lie in the committed cohort, and
    each client unmasks only after 9 members of U3 signed it (before the fix: the exact sum of 6 inputs)."""
    ids = list(range(1, 11))
    ident = P.Identities.generate(ids)
    p = _params(ids, 5, 8, 20, min_inputs=9)
    real = [1, 2, 3, 4, 5, 6]
    pad = [1001, 1002, 1003] if padding == "invented ids" else [7, 8, 9]
    try:
        clients = {i: P.Client(i, ident.keys[i], ident.directory, p) for i in ids}
        server = P.Server(p)
        share = ids if padding == "invented ids" else [i for i in ids if i not in pad]   # 7-9 go silent
        adverts, sent = _advertise_and_share(clients, {i: ids for i in ids}, share)
        server.adverts = adverts
        if not _OLD_API:
            server.collect_reveals({i: c._r for i, c in clients.items()})
        routes = server.route_shares(sent)
        x = {i: np.random.default_rng(i).integers(0, 2 ** 10, 8, dtype=np.uint64) for i in ids}
        y = {i: clients[i].masked_input(x[i], routes[i]) for i in share}
        server.masked, server.u3 = {i: y[i] for i in real}, real   # collect_masked would refuse (6 < 9)
        shown = set(real) | set(pad)
        server.signatures = sigs = {i: clients[i].consistency(shown) for i in real}
        total = server.unmask([clients[i].unmask(sigs) for i in real])
        outcome = ("released the exact sum of 6 inputs" if np.array_equal(total, _sum(x, real) & np.uint64(2 ** 20 - 1))
                   else "released garbage")
    except P.ProtocolAbort as e:
        outcome = str(e)
    want = "not in the round's committed cohort" if padding == "invented ids" else "fewer than the 9 it needs"
    assert want in outcome, outcome


def test_a_server_with_sybil_clients_cannot_grind_the_neighbour_graph():
    """Review A3: 40 clients, k = 8, t = 5; the server holds 6 Sybil identities and wants >= 5 of victim 1's 8
    neighbours to be Sybils (then it holds t shares of b_1 and of s_sk_1). Before the fix it drew sessions until
    the graph fitted (~2000 tries). Now the graph comes from every member's committed randomness: once the honest
    reveals are in, the server can only change a Sybil's reveal, which no longer matches its commitment."""
    import secrets
    ids, k, t, victim, sybils = list(range(1, 41)), 8, 5, 1, set(range(2, 8))
    ident = P.Identities.generate(ids)

    def captured(nbrs):
        return len(set(nbrs) & sybils) >= t

    if _OLD_API:
        for _ in range(50_000):
            p = _params(ids, t, 8, BITS, degree=k)
            if captured(p.neighbours(victim)):
                break
        c = P.Client(victim, ident.keys[victim], ident.directory, p)
        outcome = "the victim's neighbours are Sybils" if captured(c._nbrs) else "not captured"
    else:
        p = _params(ids, t, 8, BITS, degree=k)
        clients = {i: P.Client(i, ident.keys[i], ident.directory, p) for i in ids}   # Sybils' keys: the server's
        adverts = {i: c.advertise() for i, c in clients.items()}
        reveals = {i: c.reveal(adverts) for i, c in clients.items()}
        for _ in range(50_000):   # the honest reveals are in: grind the Sybils' contributions
            forged = {**reveals, **{s: secrets.token_bytes(32) for s in sybils}}
            if captured(P.harary(ids, k, P.session_id(p.digest, adverts, forged))[victim]):
                break
        else:
            pytest.fail("grinding found no graph")
        try:
            clients[victim].share_keys(forged)
            outcome = "the victim's neighbours are Sybils" if captured(clients[victim]._nbrs) else "not captured"
        except P.ProtocolAbort as e:
            outcome = str(e)
    assert "does not match its commitment" in outcome, outcome


def test_a_client_process_refuses_weakened_parameters_and_pickled_frames(tmp_path):
    """Review A4: round parameters with threshold 1 for k = 9 (set behind the constructor's back) reached a client
    process intact through pickle, and a pickled frame ran code in it. Now frames are data-only JSON and the
    client process rebuilds (and so re-checks) the parameters."""
    import pickle
    import struct

    from federated.secagg.processes import ProcessClients
    ids = list(range(1, 11))
    weak = _params(ids, 6, 8, BITS)
    object.__setattr__(weak, "threshold", 1)
    mark = tmp_path / "server-ran-code-here"

    class Payload:
        def __reduce__(self):
            import os
            return os.mkdir, (str(mark),)

    with ProcessClients(ids, 1) as pool:
        try:
            pool.start(weak)
            outcome = "accepted threshold 1"
        except P.ProtocolAbort as e:
            outcome = str(e)
        data = pickle.dumps(Payload())
        stdin = pool.procs[0].stdin
        stdin.write(struct.pack(">Q", len(data)) + data)
        stdin.flush()
        with pytest.raises((P.ProtocolAbort, RuntimeError)) as err:
            pool._answer(pool.procs[0])
    assert "threshold must be in 5..9" in outcome, outcome
    assert not mark.exists(), "a pickled frame ran code in the client process"
    assert "not a data frame" in str(err.value)


def test_a_wrong_share_among_more_than_the_threshold_is_detected():
    """Review A6: reconstruct used the first t shares and ignored the rest, so one wrong share gave a wrong secret
    silently (and Server.unmask a wrong sum). Now every share beyond t is checked against the polynomial."""
    secret = 987654321
    sh = shamir.share(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.reconstruct(sh, 3) == secret
    bad = dict(sh)
    bad[2] = (bad[2] + 1) % shamir.PRIME
    with pytest.raises(shamir.ShamirError, match="inconsistent shares"):
        shamir.reconstruct(bad, 3)


def test_a_client_refuses_round_parameters_outside_its_run_configuration():
    """The run configuration a client gets at start (``rounds.policy``) fixes the degree rule, a majority
    threshold and the noise floor: parameters that weaken any of them are refused, whoever builds them."""
    from federated.secagg import rounds
    ids = list(range(1, 101))
    ident = P.Identities.generate(ids[:1])
    policy = rounds.policy(floor=80)
    ok = rounds.protocol_params(ids, 8, BITS, 80)
    assert (ok.k, ok.threshold, ok.min_inputs) == (40, 21, 80)
    P.Client(1, ident.keys[1], ident.directory, ok, policy)
    for bad, why in ((P.Params.new(ids, 21, 8, BITS, 40, min_inputs=10), "noise floor of 10"),
                     (P.Params.new(ids, 4, 8, BITS, 6, min_inputs=80), "degree 6"),
                     (P.Params.new(ids, 21, 8, BITS, 40, min_inputs=80), None)):
        if why is None:
            P.Client(1, ident.keys[1], ident.directory, bad, policy)
        else:
            with pytest.raises(ValueError, match=why):
                P.Client(1, ident.keys[1], ident.directory, bad, policy)
    with pytest.raises(ValueError, match="needs more than 0.6 of them"):
        P.Client(1, ident.keys[1], ident.directory, P.Params.new(ids, 21, 8, BITS, 40, 80),
                 P.Policy(min_inputs=80, small_cohort=64, degree=40, min_threshold_fraction=0.6))
