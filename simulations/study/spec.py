"""A study's grid: arms (a trainer kind with its settings) × target epsilons × replicates (× partitions for
federated arms), from the command line or a TOML study file, validated before anything runs.

Every refusal is a :class:`StudyError` whose one-line message names the field and the fix.

A *replicate* is an index (0, 1, ...), not a random seed: every run draws its DP noise and batches from fresh OS
entropy, as an ordinary ``privtrain run`` does (initial weights are a fixed public function of the architecture).
A published seed would make DP noise reproducible and void the guarantee, so ``seed`` is refused as a setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pipeline.config import DEFAULT_DATA_DIR

# Run-level keys a study may set (the rest of `--set` goes to the trainer kinds).
PRIVACY_KEYS = ("accountant", "preprocessing_epsilon", "audit_canaries", "min_slice_size", "budget_epsilon",
                "budget_delta")
RUN_KEYS = ("hidden_units", "min_auc")
FEDERATED_PARTITION_DEFAULT = "hash"
STUDY_FIELDS = ("name", "data", "output", "workdir", "trainers", "epsilons", "seeds", "partitions", "delta", "jobs",
                "set", "allow_non_private", "arm")
ARM_FIELDS = ("name", "trainer", "epsilons", "partitions", "label")


class StudyError(ValueError):
    """A bad study definition (one line naming the field and the fix); nothing has run."""


def trainer_keys(kind: str) -> Tuple[str, ...]:
    """The settings a trainer kind accepts in a study (the kind says: ``TrainerKind.study_settings``)."""
    from pipeline.trainers import get_trainer

    return get_trainer(kind).study_settings()


def known_trainers() -> Tuple[str, ...]:
    from pipeline.trainers import TRAINER_KINDS

    return tuple(TRAINER_KINDS)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of one trainer kind; the grid repeats it per epsilon, replicate and partition."""
    name: str
    trainer: str
    settings: Mapping[str, Any]            # trainer arguments
    run: Mapping[str, Any]                 # hidden_units, min_auc
    privacy: Mapping[str, Any]             # run-level privacy arguments (accountant, preprocessing_epsilon, ...)
    epsilons: Tuple[float, ...]            # target epsilons; () when the arm is non-private or has a fixed noise
    partitions: Tuple[Optional[str], ...]  # federated arms only; (None,) otherwise

    @property
    def fixed_noise(self) -> bool:
        from pipeline.trainers import get_trainer

        return get_trainer(self.trainer).config(self.settings).noise_given

    @property
    def private(self) -> bool:
        """From the kind's typed config of the arm's first point (the same ``private`` its plan states)."""
        from pipeline.trainers import get_trainer

        kind = get_trainer(self.trainer)
        return kind.is_private(kind.study_args(self.settings, self.epsilons[0] if self.epsilons else None))


@dataclasses.dataclass(frozen=True)
class Point:
    arm: Arm
    target_epsilon: Optional[float]
    replicate: int
    partition: Optional[str]

    @property
    def id(self) -> str:
        eps = "none" if self.target_epsilon is None else f"{self.target_epsilon:g}"
        part = f"/{self.partition}" if self.partition else ""
        return f"{self.arm.name}/eps={eps}{part}/rep={self.replicate}"

    def trainer_args(self, spec) -> Dict[str, Any]:
        """The kind's arguments for this point (``TrainerKind.study_args``: its study defaults, then the arm's
        settings, the point's partition and target)."""
        from pipeline.trainers import get_trainer

        return get_trainer(self.arm.trainer).study_args(self.arm.settings, self.target_epsilon, self.partition,
                                                        spec)


@dataclasses.dataclass(frozen=True)
class StudySpec:
    name: str
    data: str
    output: str
    workdir: str
    arms: Tuple[Arm, ...]
    replicates: int
    delta: Optional[float] = None
    jobs: int = 1
    allow_non_private: bool = False
    command: str = ""

    def points(self) -> List[Point]:
        out = []
        for arm in self.arms:
            epsilons: Sequence[Optional[float]] = arm.epsilons if arm.epsilons else (None,)
            for eps in epsilons:
                for part in arm.partitions:
                    for rep in range(self.replicates):
                        out.append(Point(arm, eps, rep, part))
        return out

    def to_json(self) -> Dict[str, Any]:
        """The grid as public parameters (no paths: they are the operator's)."""
        return {"name": self.name, "replicates": self.replicates, "delta": self.delta, "jobs": self.jobs,
                "allow_non_private": self.allow_non_private,
                "arms": [{"name": a.name, "trainer": a.trainer, "settings": dict(a.settings), "run": dict(a.run),
                          "privacy": dict(a.privacy), "epsilons": list(a.epsilons),
                          "partitions": [p for p in a.partitions if p]} for a in self.arms]}


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false, lists), a comma list of numbers, else the string."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        parts = [parse_value(p) for p in text.split(",") if p.strip()]
        if all(isinstance(p, (int, float)) for p in parts):
            return parts
    return text


def _epsilons(value: Any, field: str) -> Tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise StudyError(f"{field}: expected a list of epsilons (e.g. 0.5,1,2), got {value!r}")
    if not value:
        raise StudyError(f"{field}: the list is empty; give at least one target epsilon (e.g. --epsilons 1,3)")
    out = []
    for v in value:
        try:
            e = float(v)
        except (TypeError, ValueError):
            raise StudyError(f"{field}: {v!r} is not a number; give target epsilons such as 0.5,1,2") from None
        if isinstance(v, bool) or not e > 0 or math.isinf(e) or math.isnan(e):
            raise StudyError(f"{field}: epsilon {v!r} must be a finite number > 0 (a target epsilon of the "
                             "privacy guarantee)")
        out.append(e)
    if len(set(out)) != len(out):
        raise StudyError(f"{field}: epsilon listed twice in {value!r}")
    return tuple(out)


def _names(value: Any, field: str) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{field}: expected a list of names, got {value!r}")
    if not value:
        raise StudyError(f"{field}: the list is empty; name at least one")
    return tuple(value)


def _positive_int(value: Any, field: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise StudyError(f"{field}: expected a whole number >= 1, got {value!r}; {fix}")
    return int(value)


def _check_partition(p: str, field: str) -> str:
    from federated.partition import PartitionSpec

    try:
        PartitionSpec.parse(p)
    except ValueError as e:
        raise StudyError(f"{field}: {e}") from None
    return p


def _split_settings(trainer: str, settings: Mapping[str, Any], field: str, strict: bool):
    """Trainer arguments, run keys and privacy keys of one arm. ``strict``: every key must belong here."""
    own, run, privacy = {}, {}, {}
    keys = trainer_keys(trainer)
    for key, value in settings.items():
        if key == "seed":
            raise StudyError(f"{field}.seed: a study does not take random seeds (a published seed would make the "
                             "DP noise reproducible); use seeds = N for N independent replicates")
        if key in ("target_epsilon", "delta"):
            raise StudyError(f"{field}.{key}: set it with the study's epsilons / delta, not as a setting")
        if key in RUN_KEYS:
            run[key] = value
        elif key in PRIVACY_KEYS:
            privacy[key] = value
        elif key in keys:
            own[key] = value
        elif strict:
            raise StudyError(f"{field}.{key}: the {trainer} trainer has no setting {key!r}; known: "
                             f"{', '.join(sorted(keys + RUN_KEYS + PRIVACY_KEYS))}")
    if "hidden_units" in run:
        h = run["hidden_units"]
        h = [h] if isinstance(h, int) else h
        if not isinstance(h, (list, tuple)) or not h or not all(isinstance(u, int) and not isinstance(u, bool)
                                                                 and u > 0 for u in h):
            raise StudyError(f"{field}.hidden_units: expected positive layer widths (e.g. 16 or [64, 64]), got "
                             f"{run['hidden_units']!r}")
        run["hidden_units"] = tuple(h)
    return own, run, privacy


def _typed_settings(trainer: str, own: Mapping[str, Any], field: str):
    """The arm's settings parsed by the kind's typed config (e.g. ``noise_multiplier = "1.0"`` becomes 1.0, a
    private run with its DP normalisation; ``"x"`` is one StudyError), keeping only the keys the arm set; and the
    config itself."""
    from pipeline.trainers import get_trainer

    try:
        config = get_trainer(trainer).config(own)
    except ValueError as e:
        raise StudyError(f"{field}: {e}") from None
    return {k: getattr(config, k) for k in own}, config


def _make_arm(name: str, trainer: str, settings: Mapping[str, Any], epsilons, partitions, field: str,
              strict: bool) -> Arm:
    if trainer not in known_trainers():
        raise StudyError(f"{field}.trainer: unknown trainer {trainer!r}; choose from {', '.join(known_trainers())}")
    own, run, privacy = _split_settings(trainer, settings, field, strict)
    from pipeline.trainers import get_trainer

    kind = get_trainer(trainer)
    own, config = _typed_settings(trainer, own, field)
    if kind.epsilon_axis == "none":
        eps: Tuple[float, ...] = ()
    elif config.noise_given:
        eps = ()   # a fixed noise: the privacy layer computes the epsilon
    else:
        eps = epsilons
        if not eps and kind.epsilon_axis == "required":
            raise StudyError(f"{field}.epsilons: the list is empty; a {trainer} arm needs target epsilons "
                             "(--epsilons 1,3) or a fixed noise multiplier")
    parts: Tuple[Optional[str], ...] = (None,)
    if kind.partitioned:
        parts = tuple(_check_partition(p, f"{field}.partitions") for p in (partitions or (FEDERATED_PARTITION_DEFAULT,)))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"{field}.name: {name!r} may only hold letters, digits, '_', '.' and '-'")
    return Arm(name=name, trainer=trainer, settings=own, run=run, privacy=privacy, epsilons=eps, partitions=parts)


def _default_workdir(name: str) -> str:
    return os.path.join(os.getcwd(), "privtrain-work", f"study-{name}")


def _finish(name, data, output, workdir, arms, seeds, delta, jobs, allow_non_private, command) -> StudySpec:
    if not arms:
        raise StudyError("trainers: the list is empty; name at least one trainer (e.g. --trainers dp_sgd,standard)")
    names = [a.name for a in arms]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise StudyError(f"arm names must be unique; {sorted(dup)} appear twice (give each [[arm]] a name)")
    replicates = _positive_int(seeds, "seeds", "the number of replicates per grid point (e.g. --seeds 3)")
    jobs = _positive_int(jobs, "jobs", "parallel runs (e.g. --jobs 2)")
    if delta is not None:
        try:
            delta = float(delta)
        except (TypeError, ValueError):
            raise StudyError(f"delta: {delta!r} is not a number; pass e.g. --delta 1e-5") from None
        if not 0 < delta < 1:
            raise StudyError(f"delta: {delta!r} must be in (0, 1); pass e.g. --delta 1e-5")
    if not output:
        raise StudyError("output: missing; pass --output DIR (tables, plots and report.html are written there)")
    if not isinstance(data, str) or not os.path.isfile(os.path.join(data, "dataset.json")):
        raise StudyError(f"data: {data!r} is not a data directory with a dataset.json; pass --data DIR")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"name: {name!r} may only hold letters, digits, '_', '.' and '-'")
    output = os.path.abspath(output)
    workdir = os.path.abspath(workdir or _default_workdir(name))
    if os.path.commonpath([output, workdir]) == output:
        raise StudyError("workdir: it lies inside --output, which leaves the trust boundary; put the private "
                         "work directory elsewhere")
    return StudySpec(name=name, data=os.path.abspath(data), output=output, workdir=workdir, arms=tuple(arms),
                     replicates=replicates, delta=delta, jobs=jobs, allow_non_private=bool(allow_non_private),
                     command=command)


def from_options(data: Optional[str], output: str, trainers="dp_sgd", epsilons="1,3", seeds=3,
                 partitions: Optional[Any] = None, delta=None, jobs=1, settings: Sequence[str] = (),
                 workdir: Optional[str] = None, name: Optional[str] = None, allow_non_private: bool = False,
                 command: str = "") -> StudySpec:
    """The command-line form: one arm per trainer; ``settings`` are ``KEY=VALUE`` or ``TRAINER.KEY=VALUE``
    strings (a plain key goes to every arm whose kind knows it, and must be known to at least one)."""
    kinds = _names(trainers, "trainers")
    eps = _epsilons(epsilons, "epsilons")
    parts = _names(partitions, "partitions") if partitions is not None else None
    per_kind: Dict[str, Dict[str, Any]] = {k: {} for k in kinds}
    for item in settings:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise StudyError(f"--set {item!r}: expected KEY=VALUE (e.g. --set epochs=5 or --set dp_sgd.epochs=5)")
        value = parse_value(text)
        scope, dot, bare = key.partition(".")
        if dot:
            if scope not in per_kind:
                raise StudyError(f"--set {item!r}: {scope!r} is not one of this study's trainers ({', '.join(kinds)})")
            per_kind[scope][bare] = value
            continue
        takers = [k for k in kinds if key in trainer_keys(k) + RUN_KEYS + PRIVACY_KEYS or key in ("seed",
                                                                                                   "target_epsilon")]
        if not takers:
            raise StudyError(f"--set {item!r}: no trainer of this study ({', '.join(kinds)}) has a setting {key!r}")
        for k in takers:
            per_kind[k][key] = value
    for k in kinds:
        if k not in known_trainers():
            raise StudyError(f"trainers: unknown trainer {k!r}; choose from {', '.join(known_trainers())}")
    arms = [_make_arm(k, k, per_kind[k], eps, parts, k, strict=True) for k in kinds]
    return _finish(name or "study", data or DEFAULT_DATA_DIR, output, workdir, arms, seeds, delta, jobs,
                   allow_non_private, command)


def from_toml(path: str, output: Optional[str] = None, workdir: Optional[str] = None, jobs: Optional[int] = None,
              command: str = "", data: Optional[str] = None) -> StudySpec:
    """A study file::

        name = "adult-gdp"          # optional
        data = "data/adult"         # relative to the project root or to the file
        seeds = 3
        epsilons = [1, 3]           # default target epsilons of the arms
        delta = 1e-5                # optional
        [[arm]]
        name = "gdp_tutorial"
        trainer = "dp_sgd"
        noise_multiplier = 0.55     # any setting of the kind, plus hidden_units, accountant, ...
    """
    import tomli

    try:
        with open(path, "rb") as f:
            raw = tomli.load(f)
    except OSError as e:
        raise StudyError(f"study file {path}: cannot be read ({e.strerror})") from None
    except tomli.TOMLDecodeError as e:
        raise StudyError(f"study file {path}: malformed TOML ({e}); see simulations/studies/*.toml") from None
    unknown = set(raw) - set(STUDY_FIELDS)
    if unknown:
        raise StudyError(f"study file {path}: unknown field {sorted(unknown)[0]!r}; known: {', '.join(STUDY_FIELDS)}")
    base = os.path.dirname(os.path.abspath(path))
    from pipeline.config import PROJECT_ROOT

    def where(p):
        if p is None or os.path.isabs(p):
            return p
        for root in (base, PROJECT_ROOT, os.getcwd()):
            if os.path.exists(os.path.join(root, p)):
                return os.path.join(root, p)
        return p

    default_eps = _epsilons(raw["epsilons"], "epsilons") if "epsilons" in raw else ()
    arms_raw = raw.get("arm")
    if arms_raw is None:
        arms_raw = [{"trainer": t} for t in _names(raw.get("trainers", []), "trainers")]
    if not isinstance(arms_raw, list) or not all(isinstance(a, dict) for a in arms_raw):
        raise StudyError(f"study file {path}: [[arm]] must be tables (see simulations/studies/*.toml)")
    if not arms_raw:
        raise StudyError(f"study file {path}: arm: the list is empty; add at least one [[arm]] with a trainer")
    shared = raw.get("set", {})
    if not isinstance(shared, dict):
        raise StudyError(f"study file {path}: set: expected a table of settings for every arm")
    arms = []
    for i, a in enumerate(arms_raw):
        field = f"arm[{i}]"
        trainer = a.get("trainer")
        if not isinstance(trainer, str):
            raise StudyError(f"study file {path}: {field}.trainer: missing; name the trainer kind "
                             f"({', '.join(known_trainers())})")
        eps = _epsilons(a["epsilons"], f"{field}.epsilons") if "epsilons" in a else default_eps
        parts = _names(a["partitions"], f"{field}.partitions") if "partitions" in a else (
            _names(raw["partitions"], "partitions") if "partitions" in raw else None)
        settings = {k: v for k, v in a.items() if k not in ARM_FIELDS}
        common = {k: v for k, v in shared.items() if k in trainer_keys(trainer) + RUN_KEYS + PRIVACY_KEYS}
        try:
            arms.append(_make_arm(str(a.get("name", trainer)), trainer, {**common, **settings}, eps, parts, field,
                                  strict=True))
        except StudyError as e:
            raise StudyError(f"study file {path}: {e}") from None
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    try:
        return _finish(str(name), where(data or raw.get("data", DEFAULT_DATA_DIR)), output or where(raw.get("output")),
                       workdir or where(raw.get("workdir")), arms, raw.get("seeds", 3), raw.get("delta"),
                       jobs if jobs is not None else raw.get("jobs", 1), raw.get("allow_non_private", False), command)
    except StudyError as e:
        raise StudyError(f"study file {path}: {e}") from None
