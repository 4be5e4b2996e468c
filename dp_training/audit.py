"""Empirical privacy audit that can fail: one-run canary auditing (Steinke, Nasr & Jagielski 2023).

Reference: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846).

The game
--------
1. ``make_canaries`` draws ``m`` synthetic rows from *public* domains only (random categorical ids in
   ``[0, buckets)``, random numeric values in a fixed range, random labels). Nothing about them
   depends on the private training rows.
2. ``insert`` flips an independent fair coin per canary and adds the canaries whose coin is heads to
   the training rows (``included`` mask). The canaries are then part of the training set: adding or
   removing one of them is exactly the add/remove-one neighbouring relation of the DP guarantee.
3. The model is trained once, as usual.
4. ``score`` computes one number per canary from the trained model alone (the logit margin on the
   canary's label: ``+logit`` for label 1, ``-logit`` for label 0; a monotone transform of the
   negative loss). The auditor guesses "in" for the ``k_+`` highest scores, "out" for the ``k_-``
   lowest and abstains on the rest; ``r = k_+ + k_-`` guesses, ``v`` of them correct.
5. ``epsilon_lower_bound`` turns ``(m, r, v)`` into the largest epsilon that the observation rejects
   at confidence ``1 - beta``: if the training algorithm were (epsilon, delta)-DP, seeing ``>= v``
   correct guesses would have probability ``<= beta``.

The bound (Theorem 3 of the paper, the (epsilon, delta) version, computed as in its Appendix D)
---------------------------------------------------------------------------------------------
With ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]`` (the success count of eps-randomized response),
an (eps, delta)-DP algorithm audited this way satisfies, for every v,

    P[correct >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i.

For delta = 0 this is the pure-DP Theorem (``P[correct >= v] <= f(v)``). ``p_value`` evaluates the
right-hand side; ``epsilon_lower_bound`` bisects for the largest epsilon whose p-value is <= beta
(any epsilon with p-value <= beta is a valid lower bound, because (eps', delta)-DP with eps' < eps
implies (eps, delta)-DP, so rejecting eps rejects every smaller eps' too). The guarantee holds for any
way of producing the guesses from the algorithm's output alone (any score, any k_+ / k_- fixed in
advance), with the probability taken over the coins of ``insert`` and the training randomness.

Choosing k_+ and k_- (multiple testing)
---------------------------------------
The paper's experiments scan several (k_+, k_-) and report the best. Reporting the maximum over
candidates without correction is not covered by the theorem. ``audit_scores`` therefore either uses a
single pair fixed in advance, or a **union bound** (Bonferroni): with ``c`` candidate pairs, each is
evaluated at ``beta / c`` and the largest resulting bound is reported; the probability that *any* of
the ``c`` bounds exceeds the true epsilon is at most ``c * beta / c = beta``. The default candidates
are ``DEFAULT_GUESS_FRACTIONS`` (total guesses ``r`` as fractions of ``m``) times
``DEFAULT_SPLITS`` (split evenly between "in" and "out", or all "in", or all "out"): up to 27 pairs, so
each is tested at beta / 27. The number of candidates is recorded in the result (``num_candidates``).

What the audit's output is a function of (publishing)
------------------------------------------------------
``run_audit`` / ``audit_scores`` read only: the trained model (through ``predict_logits_fn`` on the
canary rows), the canaries (public, data-independent) and the inclusion coins (independent of the
data). No real training row, count or statistic enters. The reported lower bound is therefore
post-processing of the DP release (the model) together with public and data-independent inputs, and
publishing it costs no additional privacy beyond the model's own guarantee. Two caveats: (i) the
canaries were *trained on*, so the released model differs from one trained without them (the
guarantee of the release covers the real rows with the canaries in the data set; canaries are not
people); (ii) the result says nothing about releases other than the model (preprocessing statistics,
exact counts, logs) unless the audited artifact includes them.

A lower bound is evidence only in one direction: a bound above the stated epsilon proves the stated
guarantee false (with probability >= 1 - beta, under the assumptions above); a bound below it proves
nothing about correctness (black-box one-run audits of DP-SGD are typically far from tight).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import optimize, special, stats

DEFAULT_CONFIDENCE = 0.95
# Candidate total guess counts r as fractions of m (k_+ = k_- = r / 2); union bound over them.
DEFAULT_GUESS_FRACTIONS: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)
# Share of the r guesses that are "in" guesses: symmetric and both one-sided variants.
DEFAULT_SPLITS: Tuple[float, ...] = (0.5, 1.0, 0.0)
METHOD = "steinke-nasr-jagielski-2023-theorem3"
_EPS_MAX = 200.0


# ------------------------------------------------------------------------------------------------
# The bound
# ------------------------------------------------------------------------------------------------
def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    for name, value in (("num_canaries", num_canaries), ("num_guesses", num_guesses),
                        ("num_correct", num_correct)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError("need 0 <= num_correct <= num_guesses <= num_canaries, got "
                         f"correct={num_correct}, guesses={num_guesses}, canaries={num_canaries}")


def p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
            delta: float = 0.0) -> float:
    """Upper bound on P[correct >= v] for an (epsilon, delta)-DP algorithm (paper, Theorem 3).

    ``num_canaries`` = m (each included independently with probability 1/2), ``num_guesses`` = r
    (non-abstentions), ``num_correct`` = v.
    """
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    _check_counts(m, r, v)
    if not epsilon >= 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))            # accuracy of eps-randomized response
    tail = float(stats.binom.sf(v - 1, r, q))   # f(v) = P[Bin(r, q) >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # alpha = max_{i=1..v} (f(v-i) - f(v)) / i = max_i P[v-i <= Bin(r, q) <= v-1] / i
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(num_guesses: int, num_correct: int, delta: float = 0.0,
                        confidence: float = DEFAULT_CONFIDENCE,
                        num_canaries: Optional[int] = None) -> float:
    """Largest epsilon rejected at ``confidence``: an (epsilon, delta)-DP algorithm makes
    ``>= num_correct`` correct guesses out of ``num_guesses`` with probability ``<= 1 - confidence``.

    ``num_canaries`` (m, the number of randomised canaries, guessed on or not) enters only through the
    delta term; it is required when ``delta > 0`` (None is accepted for delta = 0). Returns 0.0 when
    the observation is plausible even for epsilon = 0.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if num_canaries is None:
        if delta > 0:
            raise ValueError("num_canaries (m, all randomised canaries, including those abstained on) "
                             "is required when delta > 0")
        num_canaries = num_guesses
    m, r, v = num_canaries, num_guesses, num_correct
    _check_counts(m, r, v)
    beta = 1.0 - confidence
    pv = lambda eps: p_value(m, r, v, eps, delta)  # noqa: E731
    if pv(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0          # invariant: pv(lo) <= beta < pv(hi)
    while pv(hi) <= beta:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_MAX:
            return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if pv(mid) <= beta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-7:
            break
    return lo


# ------------------------------------------------------------------------------------------------
# Guesses from scores, choice of k
# ------------------------------------------------------------------------------------------------
def count_correct(scores: np.ndarray, included: np.ndarray, k_positive: int, k_negative: int,
                  rng: Optional[np.random.Generator] = None) -> int:
    """Guesses "in" for the ``k_positive`` highest scores and "out" for the ``k_negative`` lowest;
    returns the number of correct guesses. Ties are broken by a random permutation independent of
    ``included`` (``rng``; a fixed one when None), so the guess is a function of the scores alone."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    m = scores.shape[0]
    if included.shape[0] != m:
        raise ValueError(f"{m} scores but {included.shape[0]} inclusion coins")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if k_positive < 0 or k_negative < 0 or k_positive + k_negative > m:
        raise ValueError(f"need k_positive, k_negative >= 0 and k_positive + k_negative <= m = {m}, "
                         f"got {k_positive}, {k_negative}")
    rng = rng if rng is not None else np.random.default_rng(0)
    tiebreak = rng.permutation(m)
    order = np.lexsort((tiebreak, -scores))      # descending score, random among ties
    top, bottom = order[:k_positive], order[m - k_negative:] if k_negative else order[:0]
    return int(included[top].sum() + (~included[bottom]).sum())


def candidate_guesses(num_canaries: int,
                      fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
                      splits: Sequence[float] = DEFAULT_SPLITS) -> Tuple[Tuple[int, int], ...]:
    """(k_+, k_-) candidates: total guesses r ~ fraction * m, of which a share ``split`` are "in"
    guesses (k_+ = round(split * r)) and the rest "out" guesses; deduplicated, r >= 1.

    The default splits are symmetric (0.5) and one-sided (1.0: only "in" guesses; 0.0: only "out"
    guesses). One-sided guessing matters for over-confident models: the canaries left out of training
    get extreme logits of either sign, so the highest scores mix in- and out-canaries while the lowest
    scores (confidently wrong on the canary's label) are reliably "out"."""
    pairs = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {f!r}")
        r = max(1, int(round(f * num_canaries)))
        for split in splits:
            if not 0 <= split <= 1:
                raise ValueError(f"splits must be in [0, 1], got {split!r}")
            kp = int(round(split * r))
            pair = (kp, r - kp)
            if pair not in pairs:
                pairs.append(pair)
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The audit's outcome; a function of the model's canary scores and the inclusion coins only."""
    epsilon_lower_bound: float
    num_canaries: int
    guesses: int
    correct: int
    confidence: float
    method: str
    delta: float = 0.0
    k_positive: int = 0
    k_negative: int = 0
    num_candidates: int = 1
    stated_epsilon: Optional[float] = None

    @property
    def contradicts_stated(self) -> Optional[bool]:
        """True when the empirical lower bound exceeds the stated epsilon (the guarantee is false)."""
        if self.stated_epsilon is None:
            return None
        return self.epsilon_lower_bound > self.stated_epsilon

    def to_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["contradicts_stated"] = self.contradicts_stated
        if d["stated_epsilon"] is not None and not math.isfinite(d["stated_epsilon"]):
            d["stated_epsilon"] = "inf"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float = 0.0,
                 confidence: float = DEFAULT_CONFIDENCE,
                 candidates: Optional[Sequence[Tuple[int, int]]] = None,
                 stated_epsilon: Optional[float] = None,
                 rng: Optional[np.random.Generator] = None) -> AuditResult:
    """Lower bound from per-canary scores (higher = more likely included) and the inclusion coins.

    ``candidates``: (k_+, k_-) pairs; one pair = fixed in advance (full ``confidence``); several =
    union bound, each evaluated at ``(1 - confidence) / len(candidates)``, best reported. Default:
    ``candidate_guesses(m)``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    m = scores.shape[0]
    if m == 0:
        raise ValueError("no canaries to audit")
    pairs = tuple(candidates) if candidates is not None else candidate_guesses(m)
    if not pairs:
        raise ValueError("no (k_positive, k_negative) candidates")
    per_test_confidence = 1.0 - (1.0 - confidence) / len(pairs)
    best = None
    for kp, kn in pairs:
        v = count_correct(scores, included, int(kp), int(kn), rng)
        eps = epsilon_lower_bound(int(kp) + int(kn), v, delta, per_test_confidence, num_canaries=m)
        if best is None or eps > best[0]:
            best = (eps, int(kp), int(kn), v)
    eps, kp, kn, v = best
    return AuditResult(epsilon_lower_bound=float(eps), num_canaries=m, guesses=kp + kn, correct=v,
                       confidence=float(confidence), method=METHOD, delta=float(delta),
                       k_positive=kp, k_negative=kn, num_candidates=len(pairs),
                       stated_epsilon=None if stated_epsilon is None else float(stated_epsilon))


# ------------------------------------------------------------------------------------------------
# Canaries for the platform's tabular models
# ------------------------------------------------------------------------------------------------
# A feature layout maps each model input name to None (numeric, float32 [n, 1]) or to the number of
# buckets of a categorical input (int64 [n, 1], ids in [0, buckets)).
FeatureLayout = Mapping[str, Optional[int]]


@dataclasses.dataclass(frozen=True)
class Canaries:
    features: Dict[str, np.ndarray]
    labels: np.ndarray          # float32 [m] in {0, 1}

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def layout_from_model(model) -> Dict[str, Optional[int]]:
    """The feature layout of a Keras model built like ``pipeline.model.build_model``: float inputs are
    numeric; each int input's bucket count is read from the CategoryEncoding layer that consumes it."""
    import tensorflow as tf
    layout: Dict[str, Optional[int]] = {}
    for inp in model.inputs:
        name = inp.name.split(":")[0]
        if inp.dtype.is_floating:
            layout[name] = None
            continue
        buckets = None
        for layer in model.layers:
            if isinstance(layer, tf.keras.layers.CategoryEncoding):
                for node in layer._inbound_nodes:  # pylint: disable=protected-access
                    if any(t is inp for t in tf.nest.flatten(node.input_tensors)):
                        buckets = int(layer.num_tokens)
        if buckets is None:
            raise ValueError(f"cannot find the number of buckets of categorical input {name!r}; "
                             "give the layout explicitly")
        layout[name] = buckets
    return layout


def make_canaries(feature_layout: FeatureLayout, m: int, rng: np.random.Generator,
                  numeric_range: Tuple[float, float] = (-3.0, 3.0),
                  shape: Optional[Mapping[str, int]] = None) -> Canaries:
    """``m`` synthetic canary rows drawn from public domains only: numeric inputs uniform on
    ``numeric_range`` (a declared range of the normalised features, not estimated from data),
    categorical ids uniform on ``[0, buckets)``, labels fair coins. Independent of the private data.

    ``shape`` optionally gives the width of an input (default 1: ``[m, 1]``)."""
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    lo, hi = numeric_range
    if not hi > lo:
        raise ValueError(f"numeric_range must be (low, high) with high > low, got {numeric_range!r}")
    features: Dict[str, np.ndarray] = {}
    for name, buckets in feature_layout.items():
        width = int((shape or {}).get(name, 1))
        if buckets is None:
            features[name] = rng.uniform(lo, hi, size=(m, width)).astype(np.float32)
        else:
            if int(buckets) < 1:
                raise ValueError(f"categorical input {name!r} needs >= 1 bucket, got {buckets!r}")
            features[name] = rng.integers(0, int(buckets), size=(m, width)).astype(np.int64)
    labels = rng.integers(0, 2, size=m).astype(np.float32)
    return Canaries(features=features, labels=labels)


def insert(features: Mapping[str, np.ndarray], labels: np.ndarray, canaries: Canaries,
           rng: np.random.Generator) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Adds each canary to the training rows independently with probability 1/2.

    Returns ``(features', labels', included)``; the rows are shuffled together (the canaries'
    positions carry no information). ``included`` is the [m] bool mask of the coins: keep it secret
    from whoever computes the guesses, and use it only to count correct guesses."""
    m = len(canaries)
    missing = set(canaries.features) ^ set(features)
    if missing:
        raise ValueError(f"canary and training features differ: {sorted(missing)}")
    labels = np.asarray(labels)
    included = rng.random(m) < 0.5
    n = labels.shape[0]
    perm = rng.permutation(n + int(included.sum()))
    out = {}
    for name, x in features.items():
        c = canaries.features[name]
        if c.shape[1:] != np.asarray(x).shape[1:]:
            raise ValueError(f"canary input {name!r} has shape {c.shape[1:]}, data {np.asarray(x).shape[1:]}")
        out[name] = np.concatenate([np.asarray(x), c[included].astype(np.asarray(x).dtype)])[perm]
    y = np.concatenate([labels.reshape(n, *labels.shape[1:]),
                        canaries.labels[included].reshape(-1, *labels.shape[1:]).astype(labels.dtype)])
    return out, y[perm], included


def score(predict_logits_fn: Callable[[Dict[str, np.ndarray]], np.ndarray],
          canaries: Canaries) -> np.ndarray:
    """Per-canary score: the logit margin on the canary's label (``+logit`` if label 1, ``-logit`` if
    label 0). Higher = the model agrees more with the canary = more likely trained on. Equals
    ``log(p_label / (1 - p_label))``, a strictly increasing function of the negative loss."""
    logits = np.asarray(predict_logits_fn(dict(canaries.features)), dtype=np.float64).reshape(-1)
    if logits.shape[0] != len(canaries):
        raise ValueError(f"predict_logits_fn returned {logits.shape[0]} logits for {len(canaries)} canaries")
    sign = 2.0 * canaries.labels.astype(np.float64) - 1.0
    return sign * logits


def run_audit(predict_logits_fn: Callable[[Dict[str, np.ndarray]], np.ndarray], canaries: Canaries,
              included: np.ndarray, delta: float = 0.0, confidence: float = DEFAULT_CONFIDENCE,
              candidates: Optional[Sequence[Tuple[int, int]]] = None,
              stated_epsilon: Optional[float] = None) -> AuditResult:
    """Scores the canaries with the trained model and returns the one-run lower bound.

    A function only of the model (``predict_logits_fn`` applied to the canary rows), the canaries and
    the inclusion coins: post-processing of the DP release (see the module docstring)."""
    scores = score(predict_logits_fn, canaries)
    return audit_scores(scores, included, delta=delta, confidence=confidence, candidates=candidates,
                        stated_epsilon=stated_epsilon)


# ------------------------------------------------------------------------------------------------
# Gaussian mechanism helpers (exact epsilon of mu-GDP; used for stated epsilons and simulations)
# ------------------------------------------------------------------------------------------------
def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity / sigma = mu (Balle & Wang 2018)."""
    if mu <= 0:
        return 0.0
    # e^eps * Phi(-eps/mu - mu/2) in log space (no overflow at large eps)
    second = math.exp(min(epsilon + float(stats.norm.logcdf(-epsilon / mu - mu / 2)), 700.0))
    return float(stats.norm.cdf(-epsilon / mu + mu / 2) - second)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for mu-GDP (e.g. mu = sqrt(T) / sigma for T
    full-batch DP-GD steps with noise multiplier sigma). inf for mu = inf, 0 when delta(0) <= delta."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))


def gaussian_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The mu whose exact (epsilon, delta) curve passes through (epsilon, delta)."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    hi = 1.0
    while gaussian_epsilon(hi, delta) < epsilon:
        hi *= 2.0
    return float(optimize.brentq(lambda mu: gaussian_epsilon(mu, delta) - epsilon, 1e-6, hi, xtol=1e-10))
