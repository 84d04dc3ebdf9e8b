"""Masked grouped-query attention: the dispatch point for kernels (the XLA reference is in
:mod:`dspark_jax.kernels.attention_xla`, re-exported here)."""

from __future__ import annotations

from dspark_jax.kernels._dispatch import IMPLS, check_impl  # noqa: F401  (IMPLS re-exported)
from dspark_jax.kernels.attention_xla import attention_reference, queries_as_rows, rows_as_heads  # noqa: F401
from dspark_jax.kernels.block_attention import DSparkBlockMask, dspark_block_attention


def attention(q, k, v, mask, scale, impl: str = "auto"):
    """Dispatches by ``impl`` (``"auto"|"xla"|"pallas"``); same contract as :func:`attention_reference`.

    ``mask`` may be a dense boolean array (always the XLA reference: there is no generic dense-mask kernel) or a
    structured :class:`~dspark_jax.kernels.block_attention.DSparkBlockMask` (the training block mask, spec §1.5),
    which goes to :func:`~dspark_jax.kernels.block_attention.dspark_block_attention` and so to the Pallas kernel
    when ``impl`` resolves to Pallas.
    """
    check_impl(impl, "attention")
    if isinstance(mask, DSparkBlockMask):
        return dspark_block_attention(q, k, v, mask.anchors, mask.block_keep, scale, block_size=mask.block_size,
                                      impl=impl, ctx_start=mask.ctx_start)
    return attention_reference(q, k, v, mask, scale)
