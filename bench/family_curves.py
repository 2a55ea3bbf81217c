"""Where on the curve, and on which family, a learned optimizer loses to Adam.

``run.py eval`` reports each family's mean normalized loss; a mean cannot say
whether an optimizer is slow from the first steps (steps too short), catches up
late, or stalls at a higher level. This reads the ``task_curves.npz`` of one or
more ``run.py eval`` output folders made on the same held-out tasks (e.g. one
per architecture, which cannot be batched) and prints, per family, each learned
optimizer's normalized loss at the given steps and its mean over the curve,
beside Adam at its best fixed rate over all tasks and Adam tuned per task.

    python bench/family_curves.py EVAL_OUT [EVAL_OUT ...] --steps 10,30,100,300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

from selfloop.evaluation.report import TASK_CURVES_FILE, Curves, read_task_curves


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_task_curves(out_dir: Path) -> tuple[np.ndarray, Curves]:
    if not (out_dir / TASK_CURVES_FILE).is_file():
        fail(f"{out_dir / TASK_CURVES_FILE}: not found; expected the output folder of `run.py eval` "
             f"(it writes {TASK_CURVES_FILE})")  # fmt: skip
    return read_task_curves(out_dir)


def merged_curves(out_dirs: list[Path]) -> tuple[np.ndarray, Curves]:
    """The learned optimizers of every folder and the Adam curves of the first; the folders
    must hold the same tasks (the same Adam curves). Where two folders hold an optimizer of
    the same name (every run's members are m0, m1, ...), each learned optimizer is shown as
    FOLDER/NAME, so that no folder's curves replace another's."""
    families, first = load_task_curves(out_dirs[0])
    adam = {name: values for name, values in first.per_task.items() if name.startswith("adam")}
    learned = []  # (folder, name, curves) of every folder's learned optimizers
    for out_dir in out_dirs:
        other_families, other = load_task_curves(out_dir)
        same_adam = all(np.array_equal(other.per_task[name], values) for name, values in adam.items())
        if not (np.array_equal(other_families, families) and same_adam):
            fail(f"{out_dir}: not the held-out tasks of {out_dirs[0]} (evaluate both on the same set)")
        learned += [(out_dir.name, name, values) for name, values in other.per_task.items()
                    if not name.startswith("adam")]  # fmt: skip
    names = [name for _, name, _ in learned]
    labelled = len(set(names)) < len(names)
    shown = {(f"{folder}/{name}" if labelled else name): values for folder, name, values in learned}
    return families, Curves({**shown, **adam})


def profile_rows(families: np.ndarray, curves: Curves, steps: list[int]) -> list[tuple]:
    """(family, optimizer, [loss at each step], mean over the curve) per family and optimizer,
    families in order of appearance plus "all"; Adam's best fixed rate is the one best over
    all tasks (``Curves.best_fixed``)."""
    per_task = curves.per_task
    best_fixed = curves.best_fixed([name for name in per_task if name.startswith("adam lr=")])
    shown = {**{n: c for n, c in per_task.items() if not n.startswith("adam")},
             f"adam best fixed ({best_fixed[5:]})": per_task[best_fixed], "adam tuned": per_task["adam tuned"]}
    rows = []
    for family in [*dict.fromkeys(families.tolist()), "all"]:
        mask = np.ones(len(families), bool) if family == "all" else families == family
        for name, values in shown.items():
            mean_curve = values[mask].mean(axis=0)
            rows.append((family, name, [float(mean_curve[s]) for s in steps], float(mean_curve.mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dirs", nargs="+", type=Path, help="run.py eval output folders")
    parser.add_argument("--steps", default="10,30,100,300")
    args = parser.parse_args()
    families, curves = merged_curves(args.out_dirs)
    last = next(iter(curves.per_task.values())).shape[1] - 1
    steps = [min(int(s), last) for s in args.steps.split(",")]
    print("| family | optimizer | " + " | ".join(f"step {s}" for s in steps) + " | mean |")
    print("|---" * (len(steps) + 3) + "|")
    for family, name, at_steps, mean in profile_rows(families, curves, steps):
        print(f"| {family} | {name} | " + " | ".join(f"{v:.3f}" for v in at_steps) + f" | {mean:.3f} |")


if __name__ == "__main__":
    main()
