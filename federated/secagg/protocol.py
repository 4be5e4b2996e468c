"""SecAgg+ (Bell et al. 2020, on the rounds of Bonawitz et al. 2017): the server learns only the sum of the
surviving clients' vectors in Z_{2^bits}^d, never one client's vector.

Who chooses what. The round parameters (``Params``: the cohort, threshold t, SecAgg+ degree k, the noise floor
``min_inputs``, the ring, a fresh nonce) come from the trusted run configuration (the orchestrator that samples
the cohort and starts the clients), never from the server; each client checks them against its ``Policy`` and
binds every message to their hash ``H(params)``. The server only relays: it can drop and reorder messages, and it
chooses nothing that the clients' security depends on.

Rounds (one ``Client`` per sampled client, one ``Server``; the server only relays and sums):

0. AdvertiseKeys: each client makes two X25519 key pairs (c: channel, s: masks) and a fresh 32-byte r_i, and signs
   ``H(params) || id || c_pk || s_pk || H(r_i)`` with its long-term Ed25519 key (a PKI the clients trust, not the
   server, holds the verification keys). Once a client holds the signed adverts of the committed set C (at least
   ``max(min_inputs, t + 1)`` members of the cohort), it reveals r_i. The session id is
   ``H(H(params) || (j, H(r_j), r_j) for every j in C)``: it needs the reveal of every member of C (a missing one
   aborts the round), so nobody, the server and its Sybil clients included, can choose it once an honest client
   has revealed (commit-then-reveal).
1. ShareKeys: the neighbour graph is a random Harary graph H(k, |C|) on a permutation of C drawn from the session
   (k = |C| - 1: every other client, SecAgg). Each client splits its self-mask seed b_i and its mask secret key
   s_sk_i into t-of-k Shamir shares among its neighbours and encrypts each neighbour's pair with
   ChaCha20-Poly1305 under HKDF-SHA256(X25519(c_sk_i, c_pk_j)), bound to the session and both ids.
2. MaskedInputCollection: y_i = x_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) (mod 2^bits) over
   the neighbours j whose shares reached i; s_ij = HKDF(X25519(s_sk_i, s_pk_j)). Pairwise masks cancel in the sum.
3. ConsistencyCheck: the server announces U3 (a subset of C, at least ``min_inputs`` ids); each client signs
   ``session || U3``.
4. Unmasking: each client checks every forwarded signature (all must be valid, by members of U3) and requires
   them on the SAME U3 from at least ``max(min_inputs, t)`` distinct members of U3 and from at least t of its
   neighbours (itself included); then, once, it reveals per neighbour j the share of b_j if j is in U3, else the
   share of s_sk_j, never both. The server removes the self masks of U3 and the dropped clients' pairwise masks
   and obtains sum_{i in U3} x_i.

Security (honest clients, malicious server, ``t > k/2``): a client's y is masked by PRG(b_i), whose seed the server
gets only from t neighbours who each saw i in a signed U3; claiming i dropped after receiving y_i would need t
other neighbours to reveal s_sk_i as well, 2t > k shares from honest neighbours who answer once. Every client
works in the same view: one ``H(params)`` (the adverts' signatures), one session (the U3 signatures), so a server
that shows different parameters or different member sets to different clients gets signatures that do not
verify. A released sum holds the inputs of at least ``min_inputs`` clients that each signed U3 (they sent y_i).
Fewer than t colluding clients hold fewer than t shares of anything: Shamir hides the secret.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import secrets
import struct
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federated.secagg import prg, shamir

SHARE_BYTES = 66   # an element of GF(2^521 - 1)
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class ProtocolAbort(RuntimeError):
    """A party stops the round: too few clients left, a bad signature or ciphertext, or a repeated request."""


def _id(i: int) -> bytes:
    return struct.pack(">I", int(i))


def _kdf(shared: bytes, session: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=b"privtrain-secagg " + info).derive(shared)


def _pub(key) -> bytes:
    return key.public_key().public_bytes(**_RAW)


def _priv_bytes(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _ids_bytes(ids: Iterable[int]) -> bytes:
    return b"".join(_id(i) for i in sorted(set(int(x) for x in ids)))


# ------------------------------------------------------------------------------------------ parameters
def _int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < low:
        raise ValueError(f"secure aggregation parameter {name} must be an integer >= {low}, got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class Params:
    """Public parameters of one aggregation round, from the trusted run configuration (not from the server)."""

    clients: tuple              # the sampled cohort's ids (positive ints)
    threshold: int              # t: shares needed to reconstruct; also the fewest neighbours a round needs
    dim: int                    # vector length d
    bits: int                   # ring Z_{2^bits}
    degree: Optional[int] = None  # SecAgg+ neighbourhood size k (even); None: every other client (SecAgg)
    min_inputs: int = 1         # the fewest inputs a released sum may hold (distributed DP's noise floor)
    nonce: bytes = b""          # 32 fresh random bytes of the orchestrator: one digest per round

    def __post_init__(self):
        ids = tuple(sorted(_int("client id", c) for c in self.clients))
        if len(set(ids)) != len(ids) or len(ids) < 2:
            raise ValueError("client ids must be at least 2 distinct positive integers")
        object.__setattr__(self, "clients", ids)
        for name in ("threshold", "dim", "min_inputs"):
            object.__setattr__(self, name, _int(name, getattr(self, name)))
        object.__setattr__(self, "bits", prg.check_bits(_int("bits", self.bits)))
        if self.degree is not None:
            object.__setattr__(self, "degree", _int("degree", self.degree))
        if not isinstance(self.nonce, bytes) or len(self.nonce) != 32:
            raise ValueError("secure aggregation parameter nonce must be 32 bytes")
        k = self.k
        if not k // 2 < self.threshold <= k:
            raise ValueError(f"threshold must be in {k // 2 + 1}..{k} (more than half of the {k} neighbours, so a "
                             f"server cannot collect both shares of one client), got {self.threshold}")
        if self.min_inputs > len(ids):
            raise ValueError(f"min_inputs {self.min_inputs} exceeds the cohort of {len(ids)} clients")

    @property
    def k(self) -> int:
        return degree_in(len(self.clients), self.degree)

    @functools.cached_property
    def digest(self) -> bytes:
        """H(params): every signature of the round covers it (one view for every client)."""
        deg = 0 if self.degree is None else self.degree
        return hashlib.sha256(b"privtrain-secagg params v2" + struct.pack(">IIIII", self.threshold, self.dim,
                                                                          self.bits, deg, self.min_inputs)
                              + self.nonce + _ids_bytes(self.clients)).digest()

    @staticmethod
    def new(clients: Sequence[int], threshold: int, dim: int, bits: int, degree: Optional[int] = None,
            min_inputs: int = 1) -> "Params":
        return Params(tuple(clients), int(threshold), int(dim), int(bits), degree, int(min_inputs),
                      secrets.token_bytes(32))

    def to_wire(self) -> dict:
        return {"clients": list(self.clients), "threshold": self.threshold, "dim": self.dim, "bits": self.bits,
                "degree": self.degree, "min_inputs": self.min_inputs, "nonce": self.nonce}


def degree_in(n: int, degree: Optional[int]) -> int:
    return n - 1 if degree is None or degree >= n - 1 else int(degree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a client accepts (the trusted run configuration every client gets at start): SecAgg with every other
    client up to ``small_cohort`` clients, SecAgg+ of ``degree`` neighbours above; the threshold a majority of
    the neighbours (at least ``min_threshold_fraction`` of k); a noise floor of at least ``min_inputs``."""

    min_inputs: int = 1
    small_cohort: Optional[int] = None   # None: any degree (the threshold rule still holds)
    degree: int = 40
    min_threshold_fraction: float = 0.5

    def check(self, params: Params) -> Params:
        if not isinstance(params, Params):
            raise ValueError(f"round parameters must be Params, got {type(params).__name__}")
        n = len(params.clients)
        want = None if self.small_cohort is None or n <= self.small_cohort else self.degree
        if self.small_cohort is not None and params.k != degree_in(n, want):
            raise ValueError(f"round parameters give degree {params.degree}; the run configuration says {want} for "
                             f"a cohort of {n}")
        if params.threshold <= self.min_threshold_fraction * params.k:
            raise ValueError(f"round parameters give threshold {params.threshold} for {params.k} neighbours; the "
                             f"run configuration needs more than {self.min_threshold_fraction:g} of them")
        if params.min_inputs < self.min_inputs:
            raise ValueError(f"round parameters give a noise floor of {params.min_inputs} inputs; the run "
                             f"configuration says at least {self.min_inputs}")
        return params

    def params(self, clients: Sequence[int], dim: int, bits: int, min_inputs: Optional[int] = None) -> Params:
        n = len(list(clients))
        degree = None if self.small_cohort is None or n <= self.small_cohort else self.degree
        k = degree_in(n, degree)
        return self.check(Params.new(clients, int(self.min_threshold_fraction * k) + 1, dim, bits, degree,
                                     self.min_inputs if min_inputs is None else min_inputs))


def harary(members: Iterable[int], k: int, session: bytes) -> Dict[int, Set[int]]:
    """Each member's neighbours: a Harary graph H(k, n) on a permutation of ``members`` drawn from the session."""
    members = sorted(int(m) for m in members)
    n = len(members)
    if k >= n - 1:
        return {i: set(members) - {i} for i in members}
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"graph" + session).digest()[:16], "big"))
    order = [members[p] for p in rng.permutation(n)]
    half, out = k // 2, {}
    for pos, i in enumerate(order):
        nb = {order[(pos + o) % n] for o in range(-half, half + 1) if o}
        if k % 2:   # odd degree: add the opposite node (n even)
            nb.add(order[(pos + n // 2) % n])
        out[i] = nb
    return out


def _commit(digest: bytes, cid: int, r: bytes) -> bytes:
    return hashlib.sha256(b"commit" + digest + _id(cid) + r).digest()


def session_id(digest: bytes, adverts: Mapping[int, "Advert"], reveals: Mapping[int, bytes]) -> bytes:
    """H(H(params) || (j, H(r_j), r_j) for the committed set): no party picks it alone."""
    h = hashlib.sha256(b"session" + digest)
    for j in sorted(adverts):
        h.update(_id(j) + adverts[j].commitment + reveals[j])
    return h.digest()


@dataclasses.dataclass(frozen=True)
class Advert:
    cid: int
    c_pk: bytes
    s_pk: bytes
    commitment: bytes   # H(r_i), revealed once every advert is in
    signature: bytes

    def nbytes(self) -> int:
        return 4 + 32 + 32 + 32 + 64

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)


def _advert_message(digest: bytes, cid: int, c_pk: bytes, s_pk: bytes, commitment: bytes) -> bytes:
    return digest + b"advertise" + _id(cid) + c_pk + s_pk + commitment


def _u3_message(session: bytes, u3: Iterable[int]) -> bytes:
    return session + b"consistency" + _ids_bytes(u3)


@dataclasses.dataclass(frozen=True)
class Unmasking:
    cid: int
    b_shares: Dict[int, int]   # {j: share of b_j} for neighbours j in U3
    s_shares: Dict[int, int]   # {j: share of s_sk_j} for neighbours j in U2 \ U3

    def nbytes(self) -> int:
        return 4 + (4 + SHARE_BYTES) * (len(self.b_shares) + len(self.s_shares))

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- client
class Client:
    """One client's side of one round. Each step runs once, in order; anything else aborts. ``params`` come from
    the trusted run configuration and are checked against ``policy``."""

    def __init__(self, cid: int, signing_key: ed25519.Ed25519PrivateKey,
                 directory: Mapping[int, ed25519.Ed25519PublicKey], params: Params,
                 policy: Optional[Policy] = None):
        self.cid = int(cid)
        self.params = (policy or Policy()).check(params)
        if self.cid not in params.clients:
            raise ProtocolAbort(f"client {self.cid}: not in the round's cohort")
        self._sign = signing_key
        self._directory = directory
        self._nbrs: Set[int] = set()
        self._members: Set[int] = set()   # C: the committed set
        self.session: Optional[bytes] = None
        self._c = x25519.X25519PrivateKey.generate()
        self._s = x25519.X25519PrivateKey.generate()
        self._b = secrets.token_bytes(32)
        self._r = secrets.token_bytes(32)
        self._step = 0
        self._adverts: Dict[int, Advert] = {}
        self._channels: Dict[int, ChaCha20Poly1305] = {}
        self._held_b: Dict[int, int] = {}   # shares other clients gave me
        self._held_s: Dict[int, int] = {}
        self._u3: Optional[Set[int]] = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def _advance(self, step: int) -> None:
        if self._step != step:
            raise ProtocolAbort(f"client {self.cid}: step {step} requested at step {self._step} (each step runs "
                                "once, in order)")
        self._step = step + 1

    def _need(self, present: Iterable[int], what: str) -> None:
        got = len(set(present) & self._nbrs)
        if got < self.params.threshold:
            raise ProtocolAbort(f"client {self.cid}: {got} neighbours {what}, threshold {self.params.threshold}")

    def _channel(self, j: int) -> ChaCha20Poly1305:
        if j not in self._channels:   # one key agreement per pair, for both directions (distinct nonces)
            shared = self._c.exchange(x25519.X25519PublicKey.from_public_bytes(self._adverts[j].c_pk))
            self._channels[j] = ChaCha20Poly1305(_kdf(shared, self.session, b"channel"))
        return self._channels[j]

    def _mask_seed(self, j: int) -> bytes:
        shared = self._s.exchange(x25519.X25519PublicKey.from_public_bytes(self._adverts[j].s_pk))
        return _kdf(shared, self.session, b"mask")

    # round 0
    def advertise(self) -> Advert:
        self._advance(0)
        c_pk, s_pk = _pub(self._c), _pub(self._s)
        com = _commit(self.params.digest, self.cid, self._r)
        a = Advert(self.cid, c_pk, s_pk, com,
                   self._sign.sign(_advert_message(self.params.digest, self.cid, c_pk, s_pk, com)))
        self.bytes_sent += a.nbytes()
        return a

    def reveal(self, adverts: Mapping[int, Advert]) -> bytes:
        """Checks every advert (signed over H(params) by a cohort member); they fix the committed set C. Returns
        r_i, which fixes the session with the others' reveals."""
        self._advance(1)
        p = self.params
        for j, a in adverts.items():
            self.bytes_received += a.nbytes()
            key = self._directory.get(j)
            if key is None or a.cid != j or j not in p.clients:
                raise ProtocolAbort(f"client {self.cid}: advert of {j}, who is not in the round's cohort")
            try:
                key.verify(a.signature, _advert_message(p.digest, j, a.c_pk, a.s_pk, a.commitment))
            except InvalidSignature:
                raise ProtocolAbort(f"client {self.cid}: client {j}'s keys carry an invalid signature (forged, or "
                                    "signed for other round parameters)") from None
        if self.cid not in adverts:
            raise ProtocolAbort(f"client {self.cid}: its own advert is missing")
        need = max(p.min_inputs, p.threshold + 1)
        if len(adverts) < need:
            raise ProtocolAbort(f"client {self.cid}: {len(adverts)} clients advertised keys, fewer than the {need} "
                                f"the round needs (threshold {p.threshold}, noise floor {p.min_inputs})")
        if len({a.c_pk for a in adverts.values()} | {a.s_pk for a in adverts.values()}) != 2 * len(adverts):
            raise ProtocolAbort(f"client {self.cid}: repeated public keys among the adverts")
        self._adverts = dict(adverts)
        self._members = set(adverts)
        self.bytes_sent += 32
        return self._r

    # round 1
    def share_keys(self, reveals: Mapping[int, bytes]) -> Dict[int, bytes]:
        """Checks every member's reveal, derives the session and the graph; returns ``{j: ciphertext of (share
        of s_sk, share of b) for neighbour j}``."""
        self._advance(2)
        p = self.params
        missing = sorted(self._members - set(reveals))
        if missing:
            raise ProtocolAbort(f"client {self.cid}: no reveal from committed clients {missing[:5]}: the session "
                                "cannot be fixed, the round is aborted")
        for j in self._members:
            r = reveals[j]
            self.bytes_received += 32
            if not isinstance(r, bytes) or _commit(p.digest, j, r) != self._adverts[j].commitment:
                raise ProtocolAbort(f"client {self.cid}: client {j}'s reveal does not match its commitment")
        self.session = session_id(p.digest, self._adverts, reveals)
        self._nbrs = harary(self._members, degree_in(len(self._members), p.degree), self.session)[self.cid]
        self._adverts = {j: a for j, a in self._adverts.items() if j in self._nbrs}
        self._need(self._adverts, "advertised keys")
        holders = sorted(self._adverts)
        s_sh = shamir.share(shamir.to_int(_priv_bytes(self._s)), p.threshold, holders)
        b_sh = shamir.share(shamir.to_int(self._b), p.threshold, holders)
        out = {}
        for j in holders:
            plain = _id(self.cid) + _id(j) + s_sh[j].to_bytes(SHARE_BYTES, "big") + b_sh[j].to_bytes(SHARE_BYTES, "big")
            out[j] = self._channel(j).encrypt(_id(self.cid) + _id(j) + b"\x00" * 4, plain, self._ad(self.cid, j))
            self.bytes_sent += 4 + len(out[j])
        return out

    def _ad(self, sender: int, receiver: int) -> bytes:
        return self.session + b"share" + _id(sender) + _id(receiver)

    # round 2
    def masked_input(self, x: np.ndarray, ciphertexts: Mapping[int, bytes]) -> np.ndarray:
        """Decrypts the neighbours' shares (authenticated) and returns the masked vector y (uint64 < 2^bits)."""
        self._advance(3)
        p = self.params
        x = np.asarray(x)
        if x.shape != (p.dim,) or x.dtype != np.uint64 or (x > prg.ring_mask(p.bits)).any():
            raise ProtocolAbort(f"client {self.cid}: input must be {p.dim} uint64 elements of Z_2^{p.bits}")
        for j, ct in ciphertexts.items():
            if j not in self._adverts:
                raise ProtocolAbort(f"client {self.cid}: a share from {j}, who is not a neighbour that advertised")
            self.bytes_received += 4 + len(ct)
            try:
                plain = self._channel(j).decrypt(_id(j) + _id(self.cid) + b"\x00" * 4, ct, self._ad(j, self.cid))
            except InvalidTag:
                raise ProtocolAbort(f"client {self.cid}: the share from client {j} failed authentication") from None
            if plain[:8] != _id(j) + _id(self.cid):
                raise ProtocolAbort(f"client {self.cid}: share addressed to another pair")
            self._held_s[j] = int.from_bytes(plain[8:8 + SHARE_BYTES], "big")
            self._held_b[j] = int.from_bytes(plain[8 + SHARE_BYTES:], "big")
        self._need(self._held_s, "shared keys")
        y = x.astype(np.uint64) + prg.expand(self._b, p.dim, p.bits)
        for j in self._held_s:   # the neighbours in U2
            m = prg.expand(self._mask_seed(j), p.dim, p.bits)
            y = y + m if self.cid < j else y - m
        y &= prg.ring_mask(p.bits)
        self.bytes_sent += masked_nbytes(p.dim, p.bits)
        return y

    # round 3
    def consistency(self, u3: Iterable[int]) -> bytes:
        self._advance(4)
        u3 = set(int(c) for c in u3)
        self.bytes_received += 4 * len(u3)
        if self.cid not in u3:
            raise ProtocolAbort(f"client {self.cid}: not in the server's list of masked inputs")
        strangers = sorted(u3 - self._members)
        if strangers:
            raise ProtocolAbort(f"client {self.cid}: U3 lists {strangers[:5]}, who are not in the round's "
                                "committed cohort")
        if len(u3) < self.params.min_inputs:
            raise ProtocolAbort(f"client {self.cid}: the sum would hold {len(u3)} inputs, fewer than the "
                                f"{self.params.min_inputs} whose noise the privacy guarantee assumes")
        self._need(u3 & set(self._held_s), "in U3")
        self._u3 = u3
        self.bytes_sent += 64
        return self._sign.sign(_u3_message(self.session, u3))

    # round 4
    def unmask(self, signatures: Mapping[int, bytes]) -> Unmasking:
        """Reveals, per neighbour, the share of b (in U3) or of s_sk (dropped), after at least
        ``max(min_inputs, threshold)`` members of U3, and ``threshold`` of its neighbours, signed the same U3 this
        client signed (every forwarded signature must be valid)."""
        self._advance(5)
        p = self.params
        msg = _u3_message(self.session, self._u3)
        valid = {self.cid}   # its own signature counts
        self.bytes_received += 68 * len(signatures)
        for j, sig in signatures.items():
            if j == self.cid:
                continue
            if j not in self._u3 or j not in self._directory:
                raise ProtocolAbort(f"client {self.cid}: signature of {j}, who is not in U3")
            try:
                self._directory[j].verify(sig, msg)
            except InvalidSignature:
                raise ProtocolAbort(f"client {self.cid}: client {j} did not sign the U3 this client saw (the "
                                    "server showed different lists, sessions or parameters)") from None
            valid.add(j)
        need = max(p.min_inputs, p.threshold)
        if len(valid) < need:
            raise ProtocolAbort(f"client {self.cid}: {len(valid)} clients (itself included) signed U3, fewer than "
                                f"the {need} it needs (threshold {p.threshold}, noise floor {p.min_inputs})")
        near = len(valid & (self._nbrs | {self.cid}))
        if near < p.threshold:
            raise ProtocolAbort(f"client {self.cid}: {near} neighbours (itself included) signed U3, threshold "
                                f"{p.threshold}")
        resp = Unmasking(self.cid, {j: self._held_b[j] for j in self._held_b if j in self._u3},
                         {j: self._held_s[j] for j in self._held_s if j not in self._u3})
        self.bytes_sent += resp.nbytes()
        return resp


def masked_nbytes(dim: int, bits: int) -> int:
    """The masked vector packed at ``bits`` bits per element."""
    return (int(dim) * int(bits) + 7) // 8


# ---------------------------------------------------------------------------------------------- server
class Server:
    """Relays protocol messages and unmasks the sum. It never receives an unmasked client vector."""

    def __init__(self, params: Params):
        self.params = params
        self.adverts: Dict[int, Advert] = {}
        self.session: Optional[bytes] = None
        self.u2: Set[int] = set()
        self.routes: Dict[int, Dict[int, bytes]] = {}
        self.masked: Dict[int, np.ndarray] = {}
        self.u3: List[int] = []
        self.signatures: Dict[int, bytes] = {}

    def collect_adverts(self, adverts: Iterable[Advert]) -> Dict[int, Advert]:
        self.adverts = {a.cid: a for a in adverts if a.cid in self.params.clients}
        self._need(self.adverts, "advertised keys", self.params.threshold + 1)
        return dict(self.adverts)

    def collect_reveals(self, reveals: Mapping[int, bytes]) -> Dict[int, bytes]:
        missing = sorted(set(self.adverts) - set(reveals))
        if missing:
            raise ProtocolAbort(f"server: no reveal from committed clients {missing[:5]}: the round is aborted and "
                                "nothing is released")
        reveals = {j: reveals[j] for j in self.adverts}
        self.session = session_id(self.params.digest, self.adverts, reveals)
        return reveals

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> Dict[int, Dict[int, bytes]]:
        """``{sender: {receiver: ct}}`` -> ``{receiver: {sender: ct}}`` among the clients that sent (U2)."""
        self.u2 = set(sent) & set(self.adverts)
        self._need(self.u2, "shared keys")
        self.routes = {i: {} for i in self.u2}
        for i in self.u2:
            for j, ct in sent[i].items():
                if j in self.u2:
                    self.routes[j][i] = ct
        return self.routes

    def collect_masked(self, masked: Mapping[int, np.ndarray]) -> List[int]:
        self.masked = {i: np.asarray(y, np.uint64) for i, y in masked.items() if i in self.u2}
        self.u3 = sorted(self.masked)
        self._need(self.u3, "masked inputs")
        if len(self.u3) < self.params.min_inputs:
            raise ProtocolAbort(f"server: {len(self.u3)} masked inputs, fewer than the {self.params.min_inputs} a "
                                "released sum needs: the round is aborted and nothing is released")
        return list(self.u3)

    def collect_signatures(self, sigs: Mapping[int, bytes]) -> Dict[int, bytes]:
        self.signatures = {i: s for i, s in sigs.items() if i in self.u3}
        self._need(self.signatures, "consistency signatures", max(self.params.threshold, self.params.min_inputs))
        return dict(self.signatures)

    def _need(self, present, what: str, need: Optional[int] = None) -> None:
        need = self.params.threshold if need is None else need
        if len(present) < need:
            raise ProtocolAbort(f"server: {len(present)} clients sent {what}, fewer than {need} (threshold "
                                f"{self.params.threshold}): the round is aborted and nothing is released")

    def unmask(self, responses: Iterable[Unmasking]) -> np.ndarray:
        """sum_{i in U3} x_i (mod 2^bits)."""
        p = self.params
        b_sh: Dict[int, Dict[int, int]] = {}
        s_sh: Dict[int, Dict[int, int]] = {}
        for r in responses:
            if r.cid not in self.signatures:
                continue
            for j, v in r.b_shares.items():
                b_sh.setdefault(j, {})[r.cid] = v
            for j, v in r.s_shares.items():
                s_sh.setdefault(j, {})[r.cid] = v
        total = np.zeros(p.dim, np.uint64)
        for i in self.u3:
            total += self.masked[i]
            shares = b_sh.get(i, {})
            if len(shares) < p.threshold:
                raise ProtocolAbort(f"server: {len(shares)} shares of client {i}'s self mask, threshold "
                                    f"{p.threshold}: the round is aborted")
            total -= prg.expand(shamir.to_bytes(shamir.reconstruct(shares, p.threshold)), p.dim, p.bits)
        for j in sorted(self.u2 - set(self.u3)):   # dropped after sharing: remove their pairwise masks
            shares = s_sh.get(j, {})
            if len(shares) < p.threshold:
                raise ProtocolAbort(f"server: {len(shares)} shares of dropped client {j}'s key, threshold "
                                    f"{p.threshold}: the round is aborted")
            s_sk = x25519.X25519PrivateKey.from_private_bytes(
                shamir.to_bytes(shamir.reconstruct(shares, p.threshold)))
            for i in self.u3:
                if j not in self.routes.get(i, {}):
                    continue   # i never received j's shares, so never masked with j
                seed = _kdf(s_sk.exchange(x25519.X25519PublicKey.from_public_bytes(self.adverts[i].s_pk)),
                            self.session, b"mask")
                m = prg.expand(seed, p.dim, p.bits)
                total = total - m if i < j else total + m   # undo i's term: +m if i < j, -m if i > j
        return total & prg.ring_mask(p.bits)


# --------------------------------------------------------------------------------------- a whole round
@dataclasses.dataclass
class Identities:
    """Long-term Ed25519 signing keys and the PKI directory of their public halves."""

    keys: Dict[int, ed25519.Ed25519PrivateKey]

    @property
    def directory(self) -> Dict[int, ed25519.Ed25519PublicKey]:
        return {i: k.public_key() for i, k in self.keys.items()}

    @staticmethod
    def generate(ids: Iterable[int]) -> "Identities":
        return Identities({int(i): ed25519.Ed25519PrivateKey.generate() for i in ids})


@dataclasses.dataclass
class RoundResult:
    total: np.ndarray          # sum over U3 (mod 2^bits)
    u3: List[int]              # whose inputs are in the sum
    bytes_per_client: float    # mean bytes sent + received by a client that finished
    server: Server
    critical_path_seconds: float = 0.0   # per step the slowest client, plus the server: the latency with
    #                                      clients on their own devices (the simulation runs them one by one)


class LocalClients:
    """The round's clients as objects in this process (the long-term keys in ``identities``)."""

    @property
    def directory(self) -> Dict[int, ed25519.Ed25519PublicKey]:
        return self.identities.directory

    def __init__(self, identities: Identities, policy: Optional[Policy] = None):
        self.identities = identities
        self.policy = policy or Policy()
        self.clients: Dict[int, Client] = {}

    def start(self, params: Params) -> None:
        """``params``: from the trusted run configuration (each client checks them against ``policy``)."""
        directory = self.directory
        self.clients = {i: Client(i, self.identities.keys[i], directory, params, self.policy)
                        for i in params.clients}

    def call(self, method: str, args: Mapping[int, tuple]):
        """``{i: args}`` -> (``{i: client i's method(*args)}``, the slowest client's seconds)."""
        out, slowest = {}, 0.0
        for i, a in args.items():
            t = time.perf_counter()
            out[i] = getattr(self.clients[i], method)(*a)
            slowest = max(slowest, time.perf_counter() - t)
        return out, slowest

    def bytes_per_client(self, ids) -> float:
        return float(np.mean([self.clients[i].bytes_sent + self.clients[i].bytes_received for i in ids]))


def run_round(params: Params, inputs: Mapping[int, np.ndarray], clients,
              drop: Optional[Mapping[int, Iterable[int]]] = None) -> RoundResult:
    """Runs the five rounds; ``clients``: ``Identities`` (clients as objects here), ``LocalClients`` or
    ``processes.ProcessClients`` (clients in their own processes). ``drop[r]``: clients that go silent from round
    r (0..4) on: 0 AdvertiseKeys (the advert and the reveal), 1 ShareKeys, 2 MaskedInputCollection, 3
    ConsistencyCheck, 4 Unmasking. ``params`` come from the trusted run configuration: the clients get them from
    ``clients.start``, not from the server. The server object only ever holds protocol messages, masked vectors
    and the sum."""
    if isinstance(clients, Identities):
        clients = LocalClients(clients)
    drop = {r: set(v) for r, v in (drop or {}).items()}
    gone: Set[int] = set()
    clients.start(params)
    server = Server(params)

    def alive(r):
        gone.update(drop.get(r, ()))
        return [i for i in params.clients if i not in gone]

    path = [0.0]

    def step(method, args):
        t = time.perf_counter()
        out, slowest = clients.call(method, args)
        # in-process: the slowest client; in processes: the step's wall time (clients run concurrently)
        path[0] += slowest if slowest is not None else time.perf_counter() - t
        return out

    def serve(call, *args):
        t = time.perf_counter()
        out = call(*args)
        path[0] += time.perf_counter() - t
        return out

    adverts = serve(server.collect_adverts, list(step("advertise", {i: () for i in alive(0)}).values()))
    reveals = serve(server.collect_reveals, step("reveal", {i: (adverts,) for i in alive(0) if i in adverts}))
    sent = step("share_keys", {i: (reveals,) for i in alive(1) if i in reveals})
    routes = serve(server.route_shares, sent)
    masked = step("masked_input", {i: (inputs[i], routes.get(i, {})) for i in alive(2) if i in server.u2})
    u3 = serve(server.collect_masked, masked)
    sigs = step("consistency", {i: (u3,) for i in alive(3) if i in u3})
    shown = serve(server.collect_signatures, sigs)
    responses = step("unmask", {i: (shown,) for i in alive(4) if i in shown})
    total = serve(server.unmask, list(responses.values()))
    done = [i for i in alive(4) if i in shown]
    per = clients.bytes_per_client(done) if done else 0.0
    return RoundResult(total, u3, per, server, path[0])
