"""selfloop: a population of randomly initialized learned optimizers that trains itself.

Importing the package imports no JAX (worker processes pin themselves to a
core before JAX starts); ``load_optimizer`` imports it when called.
"""

from __future__ import annotations


def load_optimizer(path=None):
    """A self-trained learned optimizer as an ``optax.GradientTransformation``.

    ``path``: a file written by ``python run.py export``; default: the one
    shipped with the package (selfloop/pretrained/default.h5).
    """
    from selfloop.store import optimizer

    return optimizer.load_optimizer(optimizer.PRETRAINED / "default.h5" if path is None else path)


__all__ = ["load_optimizer"]
