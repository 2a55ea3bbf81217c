"""Offline datasets: nothing here downloads anything.

- 8x8 handwritten digits (1,797 images) bundled inside the scikit-learn wheel.
- Character text: Python's own standard-library sources, present wherever
  Python is.
"""

from __future__ import annotations

import functools
import os
import sysconfig

import numpy as np

# Standard-library modules that every CPython 3.11+ ships as plain source.
TEXT_MODULES = (
    "textwrap.py",
    "string.py",
    "functools.py",
    "contextlib.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "shlex.py",
    "dataclasses.py",
    "difflib.py",
)
TEXT_VOCAB = 64  # 63 most frequent characters + one "other" symbol


@functools.cache
def digits() -> dict[str, np.ndarray]:
    """8x8 digits: ``images`` [1797, 64] float32 in [0, 1], ``labels`` [1797] int32."""
    from sklearn.datasets import load_digits  # the data ships in the wheel

    bunch = load_digits()
    return {
        "images": (bunch.data / 16.0).astype(np.float32),
        "labels": bunch.target.astype(np.int32),
    }


@functools.cache
def stdlib_text() -> dict[str, np.ndarray]:
    """Python sources as ``tokens`` [N] int32 in ``[0, TEXT_VOCAB)``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks = []
    for name in TEXT_MODULES:
        with open(os.path.join(stdlib, name), encoding="utf-8") as handle:
            chunks.append(handle.read())
    raw = np.frombuffer("\n".join(chunks).encode("utf-8"), dtype=np.uint8)
    counts = np.bincount(raw, minlength=256)
    frequent = np.argsort(-counts, kind="stable")[: TEXT_VOCAB - 1]
    table = np.full(256, TEXT_VOCAB - 1, dtype=np.int32)
    table[frequent] = np.arange(TEXT_VOCAB - 1, dtype=np.int32)
    return {"tokens": table[raw]}
