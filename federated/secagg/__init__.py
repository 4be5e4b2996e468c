"""Secure aggregation (SecAgg+) with distributed DP for federated rounds: the server learns only the noisy sum.

| module | job |
|---|---|
| ``shamir``   | t-of-n Shamir secret sharing over the prime field GF(2^521 - 1) |
| ``prg``      | ChaCha20 keystream -> uniform vectors in Z_{2^bits} (pairwise and self masks) |
| ``protocol`` | the SecAgg+ client and server state machines (Bell et al. 2020; Bonawitz et al. 2017 rounds) |
| ``processes`` | the clients in their own processes (``--worker-processes N``) |
| ``wire``     | the data-only frames (tagged JSON, no pickle) between the driver and the client processes |
| ``ddp``      | the distributed discrete Gaussian encoder: rotation, scaling, conditional rounding, noise, modulus |
| ``dgauss``   | exact discrete Gaussian sampling (integer arithmetic) from a ChaCha20 stream |
| ``accounting`` | the distributed discrete Gaussian RDP bound (Kairouz et al. 2021) and an exact check |

Everything here is TF-free plain Python/numpy on the ``cryptography`` package (X25519, Ed25519, HKDF-SHA256,
ChaCha20, ChaCha20-Poly1305). Threat model: ``docs/federated.md`` ("Secure aggregation").
"""
