"""``python run.py eval``: every member of a checkpoint against Adam on held-out tasks.

Every member trains each of E held-out tasks for T steps (farm units, one per
task, all members batched); Adam at the paper's 15 fixed learning rates runs
on the very same tasks, initializations and data (cached on disk per task set
and T). Curves are TaskSet-normalized per task (Metz et al. 2020) and averaged over
tasks. For each member and baseline:

- ``mean``: the mean of its normalized curve (over steps and tasks);
- ``final``: its normalized loss after the last step, averaged over tasks;
- ``beats_tuned``: the fraction of tasks on which its mean normalized loss is
  below per-task tuned Adam's (the rate with the lowest mean on that task);
- ``speedup``: how much sooner it reaches a common loss than the Adam
  envelope (per step, the best fixed rate's task-averaged curve): the level
  is the worse of the two final values, and speedup = steps the envelope needs
  / steps it needs (> 1: faster than every fixed-rate Adam).

Beside them, each family's mean for every optimizer (``by_family``): a mean
over a mix of families can hide the one family where a learned optimizer
loses, and that family is where it fails to generalize.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfloop.evaluation.heldout import AdamReference, adam_reference, all_succeeded, normalized_curves
from selfloop.farm.curves import CurveUnit, run_curve_unit, stack_thetas
from selfloop.tasks.base import TaskSpec

TASK_CURVES_FILE = "task_curves.npz"  # every task's curve per optimizer, beside results.json
CURVE_KEY_PREFIX = "curve/"  # its key for optimizer NAME is "curve/NAME"


@dataclass(frozen=True)
class Curves:
    """Normalized learning curves: ``per_task[name]`` is [tasks, steps + 1]."""

    per_task: dict[str, np.ndarray]

    def mean_curve(self, name: str) -> np.ndarray:
        return self.per_task[name].mean(axis=0)

    def best_fixed(self, adam_names: list[str]) -> str:
        """The fixed Adam rate with the lowest mean over all tasks: the rate a user would pick."""
        return min(adam_names, key=lambda name: self.mean_curve(name).mean())


def first_step_at_or_below(curve: np.ndarray, level: float) -> int:
    """The first step whose value is <= level (len(curve) if none)."""
    hits = np.nonzero(curve <= level + 1e-12)[0]
    return int(hits[0]) if hits.size else len(curve)


def speedup(curve: np.ndarray, envelope: np.ndarray) -> float:
    level = max(curve[-1], envelope[-1])
    return max(first_step_at_or_below(envelope, level), 1) / max(first_step_at_or_below(curve, level), 1)


def collect_curves(member_curves: list[np.ndarray], reference: AdamReference, learning_rates,
                   names: list[str]) -> Curves:  # fmt: skip
    """Normalize the lopts' (``names``) and Adam's raw curves per task; add per-task tuned Adam."""
    members = np.stack([normalized_curves(c, reference, t) for t, c in enumerate(member_curves)])  # [E, T+1, M]
    adam = np.stack([normalized_curves(c, reference, t) for t, c in enumerate(reference.curves)])  # [E, T+1, 15]
    tuned_rate = adam.mean(axis=1).argmin(axis=1)  # per task: the rate with the lowest mean normalized loss
    per_task = {name: members[:, :, i] for i, name in enumerate(names)}
    per_task.update({f"adam lr={rate:.2g}": adam[:, :, k] for k, rate in enumerate(learning_rates)})
    per_task["adam tuned"] = adam[np.arange(len(adam)), :, tuned_rate]
    return Curves(per_task)


def metrics(curves: Curves, adam_names: list[str]) -> dict[str, dict[str, float]]:
    envelope = np.min(np.stack([curves.mean_curve(n) for n in adam_names]), axis=0)
    tuned_per_task = curves.per_task["adam tuned"].mean(axis=1)
    table = {}
    for name, per_task in curves.per_task.items():
        curve = curves.mean_curve(name)
        table[name] = {
            "mean": float(curve.mean()),
            "final": float(curve[-1]),
            "beats_tuned": float(np.mean(per_task.mean(axis=1) < tuned_per_task)),
            "speedup": float(speedup(curve, envelope)),
        }
    return table


def by_family(curves: Curves, families: list[str], adam_names: list[str]) -> dict[str, dict[str, float]]:
    """family -> optimizer -> its mean normalized loss over that family's tasks
    (``families[i]`` is task i's family), plus "adam best fixed": on each family,
    the fixed rate that is best over all tasks, the rate a user would pick."""
    family_of = np.asarray(families)
    best_fixed = curves.best_fixed(adam_names)
    table = {}
    for family in dict.fromkeys(families):
        rows = family_of == family
        table[family] = {name: float(per_task[rows].mean()) for name, per_task in curves.per_task.items()}
        table[family]["adam best fixed"] = table[family][best_fixed]
    return table


def evaluate_lopts(thetas: dict[str, object], lopt_config, specs: tuple[TaskSpec, ...], steps: int, chunk: int,
                   map_fn, cache_dir: Path) -> tuple[Curves, dict, dict]:  # fmt: skip
    """Curves, metrics and per-family means (``by_family``) for each named θ (members of a
    checkpoint, or exported optimizers) on ``specs``."""
    from selfloop.evaluation import ADAM_LEARNING_RATES

    reference = adam_reference(specs, steps, chunk, map_fn, cache_dir)
    stacked = stack_thetas(list(thetas.values()))
    units = [CurveUnit(spec, lopt_config, stacked, steps, chunk) for spec in specs]
    member_curves = all_succeeded(list(map_fn(run_curve_unit, units)), "evaluation")
    curves = collect_curves(member_curves, reference, ADAM_LEARNING_RATES, list(thetas))
    adam_names = [f"adam lr={rate:.2g}" for rate in ADAM_LEARNING_RATES]
    return curves, metrics(curves, adam_names), by_family(curves, [spec.family for spec in specs], adam_names)


def write_outputs(out_dir: Path, curves: Curves, table: dict, families: dict, about: dict) -> list[Path]:
    """results.json (everything), metrics.csv, curves.csv (mean normalized curves),
    task_curves.npz (each task's normalized curve per optimizer, and the tasks' families)
    and, where matplotlib is installed, figure2.png; the files written."""
    from selfloop.observe.figures import PlotExtraMissing, figure2

    out_dir.mkdir(parents=True, exist_ok=True)
    mean_curves = {name: curves.mean_curve(name).tolist() for name in curves.per_task}
    (out_dir / "results.json").write_text(json.dumps(
        {**about, "metrics": table, "by_family": families, "mean_curves": mean_curves}, indent=1))  # fmt: skip
    with open(out_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "mean_normalized_loss", "final_normalized_loss", "fraction_beats_tuned_adam",
                         "speedup_over_adam_envelope"])  # fmt: skip
        for name, row in table.items():
            writer.writerow([name, f"{row['mean']:.5f}", f"{row['final']:.5f}", f"{row['beats_tuned']:.3f}",
                             f"{row['speedup']:.3f}"])  # fmt: skip
    names = list(curves.per_task)
    with open(out_dir / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *names])
        for step, values in enumerate(np.stack([curves.mean_curve(n) for n in names], axis=1)):
            writer.writerow([step, *(f"{v:.5f}" for v in values)])
    # Every task's curve, not only their mean: where an optimizer loses is a question of
    # which tasks and which steps (bench/family_curves.py reads this file).
    np.savez_compressed(out_dir / TASK_CURVES_FILE, task_families=np.asarray(about["task_families"]),
                        **{CURVE_KEY_PREFIX + name: values.astype(np.float32)
                           for name, values in curves.per_task.items()})  # fmt: skip
    written = [out_dir / name for name in ("results.json", "metrics.csv", "curves.csv", TASK_CURVES_FILE)]
    try:
        figure2(curves, out_dir / "figure2.png", title=about.get("title", ""))
    except PlotExtraMissing as missing:
        print(f"note: figure2.png skipped; {missing}", file=sys.stderr)
        return written
    return written + [out_dir / "figure2.png"]


def read_task_curves(out_dir: Path) -> tuple[np.ndarray, Curves]:
    """What ``write_outputs`` stored in TASK_CURVES_FILE: (each task's family, the curves)."""
    with np.load(out_dir / TASK_CURVES_FILE) as data:
        per_task = {key[len(CURVE_KEY_PREFIX):]: data[key] for key in data.files if key.startswith(CURVE_KEY_PREFIX)}
        return data["task_families"], Curves(per_task)


def format_table(table: dict) -> str:
    lines = [f"{'optimizer':16s} {'mean':>7s} {'final':>7s} {'beats tuned':>12s} {'speedup':>8s}"]
    for name, row in table.items():
        if name.startswith("adam lr=") and row["mean"] > 1.0:
            continue  # rates that do not train at all: in the files, not on screen
        lines.append(f"{name:16s} {row['mean']:7.3f} {row['final']:7.3f} {row['beats_tuned']:12.2f} "
                     f"{row['speedup']:8.2f}")  # fmt: skip
    return "\n".join(lines)


def format_family_table(families: dict, lopt_names: list[str]) -> str:
    """Per family: each learned optimizer's mean beside Adam's best fixed rate and per-task tuned."""
    columns = [*lopt_names, "adam best fixed", "adam tuned"]
    width = max(12, *(len(name) for name in columns))
    lines = [f"{'family':16s} " + " ".join(f"{name:>{width}s}" for name in columns)]
    for family, row in families.items():
        lines.append(f"{family:16s} " + " ".join(f"{row[name]:{width}.3f}" for name in columns))
    return "\n".join(lines)
