"""Kernels behind one door: each op has a pure-jnp reference; ``impl`` picks the implementation.

``impl="xla"`` forces the reference, ``impl="pallas"`` the Pallas kernel (Mosaic on TPU, Triton on GPU, interpret
mode on CPU) and ``impl="auto"`` picks Pallas on TPU/GPU and XLA on CPU, unless ``$DSPARK_KERNEL_IMPL`` (``xla`` or
``pallas``) says otherwise. See docs/KERNELS.md.
"""

from dspark_jax.kernels._dispatch import IMPLS
from dspark_jax.kernels.attention import attention, attention_reference
from dspark_jax.kernels.block_attention import (
                                                DSparkBlockMask,
                                                dspark_block_attention,
                                                dspark_block_attention_reference,
                                                dspark_block_attention_split,
)
from dspark_jax.kernels.ragged_attention import ragged_attention, ragged_attention_reference
from dspark_jax.kernels.vocab_loss import vocab_loss, vocab_loss_fused, vocab_loss_reference

__all__ = ["IMPLS", "DSparkBlockMask", "attention", "attention_reference", "dspark_block_attention",
           "dspark_block_attention_reference", "dspark_block_attention_split", "ragged_attention",
           "ragged_attention_reference", "vocab_loss", "vocab_loss_fused", "vocab_loss_reference"]
