"""Inner training tasks: families, the sampler and loss normalization."""

from __future__ import annotations

from selfloop.tasks.base import TaskFamily, TaskSpec
from selfloop.tasks.networks import (
    CharRNN,
    DelayedRecall,
    DigitsAutoencoder,
    DigitsMLP,
    LowRankAutoencoder,
    TeacherStudent,
    Toy2DClassification,
)
from selfloop.tasks.synthetic import (
    LinearRegression,
    LogisticRegression,
    NoisyQuadratic,
    Quadratic,
    TestFunction2D,
)

# Family name (as written in configs) -> family. Drives configs and tests alike.
TASK_FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        Quadratic(),
        TestFunction2D(),
        LinearRegression(),
        LogisticRegression(),
        TeacherStudent(),
        Toy2DClassification(),
        DigitsMLP(),
        DigitsAutoencoder(),
        CharRNN(),
        DelayedRecall(),
        LowRankAutoencoder(),
        NoisyQuadratic(),
    )
}

__all__ = ["TASK_FAMILIES", "TaskFamily", "TaskSpec"]
