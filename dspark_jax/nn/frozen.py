"""A variable type for parameters that are never trained (the target, a draft's copied embed/lm_head).

Optimizers are built with ``wrt=nnx.Param``; a ``Frozen`` is not a Param, so it gets no optimizer state
and no update, and stays bit-identical through training."""

from flax import nnx


class Frozen(nnx.Variable):
    """A non-trainable array carried in the model state (saved in checkpoints)."""
