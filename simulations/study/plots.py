"""The study's PNG plots (matplotlib, Agg): utility vs epsilon with 95% intervals (log-x), per-slice accuracy vs
epsilon (DP's disparate impact on small groups, Bagdasaryan et al. 2019), the audit's empirical lower bound vs
the stated epsilon, and federated accuracy per round per partition. Plotted values are table columns
(results.py declares what each is)."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

UTILITY, SLICES, AUDIT, ROUNDS = ("utility_vs_epsilon.png", "slices_vs_epsilon.png", "audit_vs_epsilon.png",
                                  "federated_rounds.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(agg: Dict[str, Any]) -> Optional[float]:
    """A private group's position on the epsilon axis: its target, else the achieved epsilon (fixed noise)."""
    if agg.get("target_epsilon") is not None:
        return float(agg["target_epsilon"])
    eps = agg.get("epsilon_mean")
    return float(eps) if isinstance(eps, (int, float)) and math.isfinite(eps) else None


def _log_x(ax, xs) -> None:
    """Log-x with the grid's epsilons as plain tick labels."""
    import matplotlib.ticker as ticker

    ax.set_xscale("log")
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def _label(agg: Dict[str, Any]) -> str:
    return agg["arm"] + (f" ({agg['partition']})" if agg.get("partition") else "")


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return os.path.basename(path)


def _series(aggregate: Sequence[Dict[str, Any]], column: str):
    """{label: ([x], [mean], [ci])} for private groups; {label: (mean, ci)} for non-private ones."""
    private: Dict[str, tuple] = {}
    flat: Dict[str, tuple] = {}
    for a in aggregate:
        mean = a.get(f"{column}_mean")
        if mean is None:
            continue
        ci = a.get(f"{column}_ci95") or 0.0
        x = _x(a)
        if x is None:
            flat[_label(a)] = (mean, ci)
        else:
            xs, ms, cs = private.setdefault(_label(a), ([], [], []))
            xs.append(x), ms.append(mean), cs.append(ci)
    return private, flat


def slice_size(aggregate: Sequence[Dict[str, Any]], name: str) -> Optional[int]:
    """The slice's number of eval rows (``slice_size[name]``), present only for a public eval split."""
    for a in aggregate:
        if a.get(f"slice_size[{name}]") is not None:
            return int(a[f"slice_size[{name}]"])
    return None


def with_size(label: str, aggregate: Sequence[Dict[str, Any]], name: str) -> str:
    """``label`` followed by the slice's size, ``(n=5,421)``, when it is known (a public eval split)."""
    size = slice_size(aggregate, name)
    return label if size is None else f"{label} (n={size:,})"


def epsilon_note(rows: Sequence[Dict[str, Any]]) -> str:
    """How to read every epsilon shown: its delta, accountant and neighbouring relation (from the guarantees)."""
    for r in rows:
        if r.get("private") and r.get("delta") is not None:
            relation = str(r.get("relation", "")).replace("_", " ")
            return f"delta {r['delta']:.2g}, {r.get('accountant')} accountant, {relation}"
    return "no private point"


def plot_utility(path: str, aggregate: Sequence[Dict[str, Any]], note: str = "") -> Optional[str]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for ax, column, title in ((axes[0], "accuracy", "accuracy"), (axes[1], "auc", "AUC")):
        private, flat = _series(aggregate, column)
        for label, (xs, ms, cs) in private.items():
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.errorbar([xs[i] for i in order], [ms[i] for i in order], yerr=[cs[i] for i in order], marker="o",
                        capsize=3, label=label)
            drawn = True
        for k, (label, (mean, ci)) in enumerate(flat.items()):
            color = f"C{(len(private) + k) % 10}"
            ax.axhline(mean, color=color, linestyle="--", label=f"{label} (non-private)")
            if ci:
                ax.axhspan(mean - ci, mean + ci, color=color, alpha=0.15)
            drawn = True
        if private:
            _log_x(ax, [x for xs, _m, _c in private.values() for x in xs])
        ax.set_xlabel(f"epsilon (target; achieved for fixed noise)\n{note}")
        ax.set_ylabel(f"{title} on the eval split")
        ax.grid(alpha=0.3)
    if not drawn:
        _plt().close(fig)
        return None
    axes[0].legend(fontsize=8)
    fig.suptitle("Utility vs privacy budget (mean and 95% interval across replicates)", y=1.02)
    return _save(fig, path)


def plot_slices(path: str, aggregate: Sequence[Dict[str, Any]], note: str = "") -> Optional[str]:
    slice_cols = sorted({c[:-len("_mean")] for a in aggregate for c in a
                         if c.startswith("accuracy[") and c.endswith("_mean")})
    if not slice_cols:
        return None
    features = sorted({c[len("accuracy["):].split("=")[0] for c in slice_cols})
    plt = _plt()
    fig, axes = plt.subplots(1, len(features), figsize=(5.2 * len(features), 3.8), squeeze=False)
    for ax, feature in zip(axes[0], features):
        cols = [c for c in slice_cols if c.startswith(f"accuracy[{feature}=")]
        for k, col in enumerate(cols):
            private, flat = _series(aggregate, col)
            # the size is only written for a public eval split (results.py)
            name = with_size(col[len("accuracy["):-1].split("=", 1)[1], aggregate, col[len("accuracy["):-1])
            for label, (xs, ms, cs) in list(private.items())[:1]:   # the first private arm
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.errorbar([xs[i] for i in order], [ms[i] for i in order], yerr=[cs[i] for i in order],
                            marker="o", capsize=3, color=f"C{k % 10}", label=name)
                _log_x(ax, xs)
            for label, (mean, ci) in list(flat.items())[:1]:
                ax.axhline(mean, color=f"C{k % 10}", linestyle=":", alpha=0.7)
                if ci:
                    ax.axhspan(mean - ci, mean + ci, color=f"C{k % 10}", alpha=0.1)
        ax.set_title(f"accuracy per {feature} slice")
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sizes = ("n: the slice's rows in the public eval split" if any(k.startswith("slice_size[") for a in aggregate
                                                                   for k in a)
             else "slice sizes not shown (the eval split is private)")
    fig.suptitle("Per-slice accuracy vs epsilon, mean and 95% interval across replicates (first private arm; dotted "
                 f"and shaded: non-private); small slices suppressed; {sizes}\n"
                 f"epsilon at {note}", y=1.06)
    return _save(fig, path)


def plot_audit(path: str, rows: Sequence[Dict[str, Any]], note: str = "") -> Optional[str]:
    pts = [(r["epsilon"], r["audit_epsilon_lower_bound"]) for r in rows
           if r.get("audit_epsilon_lower_bound") is not None and isinstance(r.get("epsilon"), (int, float))
           and math.isfinite(r["epsilon"])]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    xs, ys = zip(*pts)
    ax.scatter(xs, ys, label="one-run audit lower bound")
    top = max(max(xs), max(ys)) * 1.1
    ax.plot([0, top], [0, top], "k--", alpha=0.6, label="stated epsilon (bound must stay below)")
    ax.set_xlabel(f"stated epsilon ({note})")
    ax.set_ylabel("empirical epsilon lower bound")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rounds_ylabel(eval_public: bool) -> str:
    """The rounds plot's y label: the same eval-coverage rule as the table's accuracy columns."""
    return ("accuracy on the public eval split" if eval_public else
            "accuracy on the PRIVATE eval split (NOT covered by epsilon)")


def plot_rounds(path: str, rows: Sequence[Dict[str, Any]], eval_public: bool = True) -> Optional[str]:
    curves: Dict[str, Dict[int, List[float]]] = {}
    for r in rows:
        if r.get("round_accuracy"):
            eps = "non-private" if r.get("target_epsilon") is None else f"eps {r['target_epsilon']:g}"
            label = f"{r['arm']} {r.get('partition') or ''} {eps}".strip()
            for rnd, acc in r["round_accuracy"]:
                curves.setdefault(label, {}).setdefault(int(rnd), []).append(float(acc))
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, per_round in sorted(curves.items()):
        rounds = sorted(per_round)
        ax.plot(rounds, [sum(per_round[r]) / len(per_round[r]) for r in rounds], marker=".", label=label)
    import matplotlib.ticker as ticker

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(rounds_ylabel(eval_public))
    ax.set_title("Federated: accuracy per round per partition (mean over replicates)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_plots(output: str, rows: Sequence[Dict[str, Any]], aggregate: Sequence[Dict[str, Any]],
                eval_public: bool = True) -> List[str]:
    note = epsilon_note(rows)
    made = [plot_utility(os.path.join(output, UTILITY), aggregate, note),
            plot_slices(os.path.join(output, SLICES), aggregate, note),
            plot_audit(os.path.join(output, AUDIT), rows, note),
            plot_rounds(os.path.join(output, ROUNDS), rows, eval_public)]
    return [m for m in made if m]
