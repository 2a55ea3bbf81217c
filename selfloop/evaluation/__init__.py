"""Held-out evaluation against Adam on the very same tasks (``heldout``), Adam's
update for those runs (``baselines``, the one module that imports optax) and the
evaluation report (``report``)."""

# The paper's sweep: 1e-6 to 1e1 every half decade, 15 rates (here, not in
# baselines.py, so that reading a run's numbers never imports optax).
ADAM_LEARNING_RATES = tuple(float(10.0 ** (k / 2)) for k in range(-12, 3))
