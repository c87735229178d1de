"""The quality-cost trade-off of an eval run as a picture: quality against measured speedup and against
GFLOPs, one marker per method and setting, the Pareto front drawn."""

from __future__ import annotations

from collections.abc import Sequence

from tokenreduce.eval.runner import EvalResult

QUALITY = {  # the first measured one is plotted
    "probe_share": "probe top-1, share of unreduced",
    "knn_top1": "kNN top-1",
    "feature_cosine": "feature cosine to unreduced",
}


def pareto_front(cost: Sequence[float], quality: Sequence[float], cheaper_is_larger: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (better quality and cheaper), ordered
    from cheapest to dearest. ``cheaper_is_larger``: the cost axis is a speedup (larger is better)."""
    sign = -1.0 if cheaper_is_larger else 1.0
    order = sorted(range(len(cost)), key=lambda i: (sign * cost[i], -quality[i]))
    front, best = [], float("-inf")
    for i in order:  # cheapest first: a point joins when it beats the quality of everything cheaper
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return front


def quality_metric(results: Sequence[EvalResult]) -> str:
    """The quality column the plot uses: the first one of :data:`QUALITY` every row has."""
    for key in QUALITY:
        if all(getattr(r, key) is not None for r in results):
            return key
    raise ValueError("no quality column was measured for every method (probe, kNN or feature fidelity)")


def pareto_plot(results: Sequence[EvalResult], path: str, title: str = "") -> None:
    """Write the two-panel trade-off picture of ``results`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = quality_metric(results)
    quality = [getattr(r, key) for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, attr, label, larger in (
        (axes[0], "speedup", "measured speedup (x)", True),
        (axes[1], "gflops", "GFLOPs per image", False),
    ):
        cost = [getattr(r, attr) for r in results]
        front = pareto_front(cost, quality, larger)
        ax.plot([cost[i] for i in front], [quality[i] for i in front], "-", color="0.6", zorder=1, label="Pareto front")
        for i, (r, x, y) in enumerate(zip(results, cost, quality)):
            ax.scatter([x], [y], zorder=2, s=30)
            # alternate label sides, so that methods landing on the same point stay readable
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 else -11), fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if not larger:
            ax.invert_xaxis()  # cheaper to the right in both panels
    axes[0].set_ylabel(QUALITY[key])
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
