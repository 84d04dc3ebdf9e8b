"""nnx.Linear / nnx.Embed constructors with our init (N(0, std)) and logical sharding names."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, bias: bool = False,
           dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear whose ``kernel`` is ``[in, out]`` (transformers stores ``[out, in]``)."""
    return nnx.Linear(
        in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_metadata(nnx.initializers.normal(init_std), logical_axes=axes),
        bias_init=nnx.with_metadata(nnx.initializers.zeros_init(), logical_axes=(axes[1],)),
        precision="highest", rngs=rngs,
    )


def embed(num: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
          rngs: nnx.Rngs) -> nnx.Embed:
    """An Embed whose ``embedding`` is ``[V, H]``."""
    return nnx.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.with_metadata(nnx.initializers.normal(init_std), logical_axes=("vocab", "embed")), rngs=rngs,
    )
