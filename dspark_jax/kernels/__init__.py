"""Kernels behind one door: each op has a pure-jnp reference; ``impl`` picks the implementation.

``impl="auto"`` uses the XLA reference everywhere for now (Pallas kernels arrive with the kernels issue);
``impl="xla"`` forces it.
"""

from dspark_jax.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
