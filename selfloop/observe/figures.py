"""Figures (matplotlib, ``pip install -e ".[plot]"``): the paper's Figure 2 and a run's history."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PlotExtraMissing(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlotExtraMissing('figures need matplotlib: pip install -e ".[plot]"') from None

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def figure2(curves, out: Path, title: str = "") -> None:
    """Like the paper's Figure 2: each member's mean normalized curve in colour,
    every fixed-learning-rate Adam dashed blue, per-task tuned Adam black."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    adam_rates = [name for name in curves.per_task if name.startswith("adam lr=")]
    for name in curves.per_task:
        curve = curves.mean_curve(name)
        steps = np.arange(len(curve))
        if name.startswith("adam lr="):
            # Dashed blue as in the paper, light to dark from the smallest rate to the largest.
            shade = plt.cm.Blues(0.3 + 0.7 * adam_rates.index(name) / max(len(adam_rates) - 1, 1))
            label = name if name in (adam_rates[0], adam_rates[-1]) else None
            axis.plot(steps, curve, ls="--", color=shade, lw=0.9, alpha=0.8, label=label)
        elif name == "adam tuned":
            axis.plot(steps, curve, color="black", lw=2.0, label="Adam, tuned per task")
        else:
            axis.plot(steps, curve, lw=1.3, label=name)
    axis.plot([], [], ls="--", color="tab:blue", label="Adam, 15 fixed rates 1e-6 .. 10")
    axis.set(xlabel="inner step", ylabel="mean normalized loss (held-out tasks)", ylim=(0, 1.55), title=title)
    axis.legend(ncol=3, fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def history_figure(events: list, out: Path) -> None:
    """Each member's held-out loss over run time, PBT exploits and rollbacks marked."""
    from selfloop.events import Eval, Rollback, Round, Tournament, of_type

    plt = _pyplot()
    evals = of_type(events, Eval)
    minutes = [e.elapsed / 60 for e in evals]
    figure, axis = plt.subplots(figsize=(10, 5.5))
    for i in range(len(evals[0].members)):
        axis.plot(minutes, [e.members[i] for e in evals], lw=0.8, alpha=0.6, label=f"m{i}")
    axis.plot(minutes, [e.best for e in evals], color="black", lw=2.2, label="best member")
    champion = [(t, e.champion) for t, e in zip(minutes, evals) if e.champion is not None]
    if champion:
        axis.plot(*zip(*champion), color="tab:orange", lw=1.6, ls="--", label="PBT champion")
    running = [min(e.best for e in evals[: k + 1]) for k in range(len(evals))]
    axis.plot(minutes, [1.5 * m + 0.05 for m in running], color="grey", ls=":", label="1.5 x running min + 0.05")
    axis.axhline(evals[-1].adam_best_fixed, color="tab:blue", ls="--", label="Adam, best fixed lr")
    axis.axhline(evals[-1].adam_tuned, color="navy", ls="-.", label="Adam, tuned per task")
    by_round = {e.round: e.elapsed for e in of_type(events, Round)}
    for kind, marker, color, label in ((Tournament, "|", "tab:green", "PBT exploit"),
                                       (Rollback, "x", "tab:red", "guard rollback")):  # fmt: skip
        # Rollbacks carry only a round: place them at that round's time.
        times = [by_round.get(e.round) for e in of_type(events, kind)]
        times = [t / 60 for t in times if t is not None]
        axis.plot(times, [0.02] * len(times), marker, color=color, ms=8, ls="none", label=label)
    axis.set(xlabel="run time (minutes)", ylabel="held-out mean normalized loss", ylim=(0, 1.6),
             title="held-out loss of every member over the run")
    axis.legend(ncol=4, fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
