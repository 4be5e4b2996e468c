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
