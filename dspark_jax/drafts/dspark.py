"""DSpark draft = parallel backbone + Markov head + confidence head (spec §1); DFlash = the same model with
``markov_rank 0`` and no confidence head.

Parameter names mirror DeepSpec's checkpoint keys (``fc``, ``hidden_norm``, ``layers.i.*``, ``norm``,
``embed_tokens``, ``lm_head``, ``markov_head.*``, ``confidence_head.proj``) so the key table stays trivial.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import KVCache
from dspark_jax.decode.sampling import SamplingConfig, sample_tokens, split_keys
from dspark_jax.drafts.backbone import DraftLayer
from dspark_jax.drafts.common import DraftBase, RoundProposal
from dspark_jax.drafts.config import DSPARK_ARCH, DraftConfig
from dspark_jax.drafts.heads import ConfidenceHead, MarkovHead
from dspark_jax.nn.frozen import Frozen
from dspark_jax.nn.linear import linear
from dspark_jax.nn.norm import RMSNorm
from dspark_jax.nn.segments import segment_starts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftTrainOutput:
    """What ``train_forward`` returns (N blocks of Bs slots per sequence).

    draft_logits ``[B,N,Bs,V]``: Markov-corrected, teacher-forced (None unless materialised).
    target_logits ``[B,N,Bs,V]``: ``lm_head(last_hidden[max(label-1, 0)])`` (None unless materialised).
    confidence_logits ``[B,N,Bs]`` fp32 (None without a confidence head).
    target_ids, eval_mask ``[B,N,Bs]``.
    draft_hidden ``[B,N,Bs,H]`` (post-norm), target_hidden ``[B,N,Bs,H]`` (aligned), markov_u ``[B,N,Bs,r]``
    (None without Markov head), lm_head ``[V,H]``, markov_w2 ``[V,r]``: enough for a vocab-chunked loss.
    softcap (static): the ``cap`` of ``cap * tanh(x / cap)`` applied to the lm_head logits before the Markov bias
    (Gemma4), or None; the chunked loss must apply it too.
    """

    draft_logits: jax.Array | None
    target_logits: jax.Array | None
    confidence_logits: jax.Array | None
    target_ids: jax.Array
    eval_mask: jax.Array
    draft_hidden: jax.Array
    target_hidden: jax.Array
    markov_u: jax.Array | None
    lm_head: jax.Array
    markov_w2: jax.Array | None
    softcap: float | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
    """One proposed block per row: tokens ``[B,Bs]``; logits ``[B,Bs,V]`` (corrected; the distribution each
    token was drawn from, before temperature); confidence_logits ``[B,Bs]`` or None; block_hidden
    ``[B,Bs,H]``; cache (context only up to lengths = start; slots past it are scratch)."""

    tokens: jax.Array
    logits: jax.Array
    confidence_logits: jax.Array | None
    block_hidden: jax.Array
    cache: KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockDraftState:
    """A block draft's state in the decode loop: the verified rows' taps wait as pending context until the next
    proposal consumes them.

    cache: the draft's KV cache (context up to ``lengths``); pending ``[B, P, Lt*H]`` taps of the positions
    ``lengths .. lengths + count - 1`` (rest padding); count ``[B]`` int32."""

    cache: KVCache
    pending: jax.Array
    count: jax.Array


class DSparkDraft(DraftBase):
    """DSpark / DFlash draft for a Qwen3(-MoE) target. ``config`` must be bound (``config.arch`` set)."""

    architectures = (DSPARK_ARCH,)
    supports_plain_runs = True
    # what a family variant swaps (Gemma4: its norm and its sandwich-norm layer); everything else is shared
    norm_class = RMSNorm
    layer_class = DraftLayer

    def __init__(self, config: DraftConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if config.arch is None:
            raise ValueError("DraftConfig.arch is unset: use dj.build_draft(target, config) or config.bind(target)")
        self.check_architecture(config)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        arch = config.arch
        self.config = config
        self.dtype = jnp.dtype(dtype)
        h, v, std = arch.hidden_size, arch.vocab_size, arch.initializer_range
        init = nnx.initializers.normal(std)
        self.embed_tokens = Frozen(init(rngs.params(), (v, h), param_dtype), logical_axes=("vocab", "embed"))
        self.lm_head = Frozen(init(rngs.params(), (v, h), param_dtype), logical_axes=("vocab", "embed"))
        self.fc = linear(config.num_taps * h, h, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                         init_std=std, rngs=rngs)
        self.hidden_norm = self.norm_class(h, arch.rms_norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List([self.layer_class(arch, dtype=dtype, param_dtype=param_dtype,
                                                 attention_impl=attention_impl, rngs=rngs)
                                for _ in range(config.num_draft_layers)])
        self.norm = self.norm_class(h, arch.rms_norm_eps, param_dtype=param_dtype)
        r = config.markov_rank
        self.markov_head = MarkovHead(v, h, r, config.markov_head_type, dtype=dtype, param_dtype=param_dtype,
                                      init_std=std, rngs=rngs) if config.has_markov else None
        self.confidence_head = ConfidenceHead(
            h, r, config.confidence_head_with_markov and config.has_markov, dtype=dtype, param_dtype=param_dtype,
            init_std=std, rngs=rngs) if config.has_confidence else None
        self.init_rope()

    # ---- shared pieces -------------------------------------------------------------------
    def fuse_context(self, taps: jax.Array) -> jax.Array:
        """``[B, C, Lt*H]`` tapped target features -> ``hidden_norm(fc(taps))`` ``[B, C, H]``."""
        self.check_tap_width(taps)
        return self.hidden_norm(self.fc(taps.astype(self.dtype)))

    def backbone(self, block_h, block_pos, ctx, ctx_pos, mask, cache: KVCache | None = None, ctx_count=None,
                 remat: str = "none"):
        """Runs the layers; returns (post-norm block hidden ``[B,Q,H]``, updated context cache or None).

        Without a cache, ``mask`` covers ``[ctx ; block]`` keys (training). With one (inference), ``mask`` is unused:
        the first ``ctx_count [B]`` rows of ``ctx`` extend the cache and the block sees the whole extended context.
        ``remat``: what the backward pass recomputes of each layer (:data:`REMAT_POLICIES`; training only).
        """
        block_rope, ctx_rope = self.rope(block_pos), self.rope(ctx_pos)
        h = block_h
        keys, values = [], []
        start = None if cache is None else cache.lengths + ctx_count.astype(jnp.int32)
        call = _layer_call(remat)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            h, (k, v) = call(layer, h, block_rope, ctx, ctx_rope, mask, kv, None if cache is None else cache.lengths,
                             start)
            keys.append(k)
            values.append(v)
        new_cache = None if cache is None else KVCache(tuple(keys), tuple(values), start)
        return self.norm(h), new_cache

    def markov_u(self, hidden: jax.Array, prev: jax.Array) -> jax.Array | None:
        return None if self.markov_head is None else self.markov_head.teacher_forced(hidden, prev)

    def confidence(self, hidden: jax.Array, prev: jax.Array) -> jax.Array | None:
        if self.confidence_head is None:
            return None
        e = self.markov_head.prev_embedding(prev) if self.confidence_head.with_markov else None
        return self.confidence_head(hidden, e)

    # ---- training --------------------------------------------------------------------------
    def train_forward(self, input_ids, loss_mask, target_hidden, target_last_hidden, anchors, block_keep, *,
                      materialize_logits: bool = True, remat: str = "none", segment_ids=None,
                      positions=None) -> DraftTrainOutput:
        """Teacher-forced forward over N anchored blocks per sequence (spec §3.3).

        Args:
          input_ids, loss_mask: ``[B, S]``; target_hidden: ``[B, S, Lt*H]`` taps; target_last_hidden ``[B, S, H]``.
          anchors: ``[B, N]`` ascending anchor positions (dummies 0); block_keep: ``[B, N]`` bool.
          materialize_logits: also return ``[B,N,Bs,V]`` draft/target logits (a chunked loss does not need them).
          remat: rematerialisation of the draft layers in the backward pass (:data:`REMAT_POLICIES`).
          segment_ids, positions: ``[B, S]`` for packed rows (several conversations per row, contiguous runs of
            equal ids; RoPE positions restarting per conversation); None = one sequence per row at ``0..S-1``.
            A block sees only its anchor's segment and its labels stop at the segment's end.
        """
        cfg = self.config
        bs, mask_id = cfg.block_size, cfg.mask_token_id
        ns = cfg.num_block_slots
        b, s = input_ids.shape
        n = anchors.shape[1]
        _check_shape("target_hidden", target_hidden, (b, s, cfg.num_taps * cfg.arch.hidden_size))
        _check_shape("target_last_hidden", target_last_hidden, (b, s, cfg.arch.hidden_size))
        _check_shape("loss_mask", loss_mask, (b, s))
        _check_shape("block_keep", block_keep, (b, n))
        anchors = anchors.astype(jnp.int32)
        keep = block_keep.astype(bool)
        slots = jnp.arange(bs, dtype=jnp.int32)
        anchor_tok = jnp.take_along_axis(input_ids, anchors, axis=1)                       # [B, N]
        block_ids = jnp.concatenate([jnp.where(keep, anchor_tok, mask_id)[..., None],
                                     jnp.full((b, n, ns - 1), mask_id, input_ids.dtype)], axis=-1)
        if positions is None:
            ctx_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            anchor_pos = anchors
        else:
            ctx_pos = positions.astype(jnp.int32)
            anchor_pos = jnp.take_along_axis(ctx_pos, anchors, axis=1)
        block_pos = (anchor_pos[..., None] + jnp.arange(ns, dtype=jnp.int32)).reshape(b, n * ns)
        ctx_start = None
        if segment_ids is not None:
            ctx_start = jnp.take_along_axis(segment_starts(segment_ids), anchors, axis=1)
        # spec §1.5 mask, structured: Pallas kernel can skip tiles
        mask = kernels.DSparkBlockMask(anchors, keep, ns, ctx_start)
        ctx = self.fuse_context(target_hidden)
        out, _ = self.backbone(self.embed(block_ids.reshape(b, n * ns)), block_pos, ctx, ctx_pos, mask, remat=remat)
        # bonus-anchor slot 0 predicts the anchor itself (known): the drafting slots, and so the labels
        # x_{a+1} .. x_{a+Bs}, are the same as anchor-first's
        out = out.reshape(b, n, ns, -1)[:, :, ns - bs:]

        lab = anchors[..., None] + 1 + slots                                                # [B, N, Bs]
        safe = jnp.where(keep[..., None], jnp.minimum(lab, s - 1), 0)
        flat = safe.reshape(b, n * bs)
        target_ids = jnp.take_along_axis(input_ids, flat, axis=1).reshape(b, n, bs)
        lm_at = jnp.take_along_axis(loss_mask, flat, axis=1).reshape(b, n, bs).astype(bool)
        ok = (lab < s) & lm_at & keep[..., None]
        if segment_ids is not None:
            # a label in the next conversation of the row is not this block's: no loss, and id 0 (as right
            # padding would give) so that no output of the block reads the other conversation
            seg_at = jnp.take_along_axis(segment_ids, flat, axis=1).reshape(b, n, bs)
            same = seg_at == jnp.take_along_axis(segment_ids, anchors, axis=1)[..., None]
            ok = ok & same
            target_ids = jnp.where(same, target_ids, 0)
        eval_mask = jnp.cumprod(ok, axis=-1).astype(jnp.float32)
        tgt_idx = jnp.maximum(flat - 1, 0)
        tgt_hidden = jnp.take_along_axis(target_last_hidden, tgt_idx[..., None], axis=1).reshape(b, n, bs, -1)
        tgt_hidden = jax.lax.stop_gradient(tgt_hidden.astype(self.dtype))
        prev = jnp.concatenate([anchor_tok[..., None], target_ids[..., :-1]], axis=-1)

        u = self.markov_u(out, prev)
        conf = self.confidence(out, prev)
        w2 = None if self.markov_head is None else self.markov_head.markov_w2[...]
        draft_logits = target_logits = None
        if materialize_logits:
            draft_logits = self.base_logits(out)
            if u is not None:
                draft_logits = draft_logits + self.markov_head.bias(u)
            target_logits = self.base_logits(tgt_hidden)
        return DraftTrainOutput(draft_logits=draft_logits, target_logits=target_logits, confidence_logits=conf,
                                target_ids=target_ids, eval_mask=eval_mask, draft_hidden=out,
                                target_hidden=tgt_hidden, markov_u=u, lm_head=self.lm_head[...], markov_w2=w2)

    # ---- inference -------------------------------------------------------------------------
    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        a = self.config.arch
        return KVCache.create(self.config.num_draft_layers, batch, capacity, a.num_key_value_heads, a.head_dim,
                              dtype or self.dtype)

    def block_hidden(self, cache: KVCache, ctx_taps, ctx_count, anchor):
        """The backbone part of a proposal (spec §4.2 steps 1-4).

        Args:
          cache: context-only KV cache (lengths c).
          ctx_taps: ``[B, P, Lt*H]`` pending context features for positions ``c .. c+count-1`` (rest padding).
          ctx_count: ``[B]`` pending rows per row; anchor: ``[B]`` the last committed token (at ``start``).
        Returns: (block hidden ``[B, Bs, H]`` post-norm, one row per drafting slot, cache with lengths
        ``start = c + count``). Under the bonus-anchor convention the backbone runs ``Bs + 1`` slots and the
        anchor slot's row is dropped.

        When the layers' attention resolves to the Pallas kernel the block's keys are kept in the cache at
        ``[start, start + slots)`` (past the length: scratch), so the capacity must leave that room.
        """
        bs, mask_id = self.config.block_size, self.config.mask_token_id
        ns = self.config.num_block_slots
        b, p = ctx_taps.shape[:2]
        if cache.capacity < p:
            raise ValueError(f"draft cache capacity {cache.capacity} < {p} pending context rows")
        c = cache.lengths
        start = c + ctx_count.astype(jnp.int32)
        ctx_pos = c[:, None] + jnp.arange(p, dtype=jnp.int32)
        block_pos = start[:, None] + jnp.arange(ns, dtype=jnp.int32)
        block_ids = jnp.concatenate([anchor[:, None].astype(jnp.int32), jnp.full((b, ns - 1), mask_id, jnp.int32)], 1)
        out, cache = self.backbone(self.embed(block_ids), block_pos, self.fuse_context(ctx_taps), ctx_pos, None,
                                   cache, ctx_count)
        return out[:, ns - bs:], cache

    def propose(self, cache: KVCache, ctx_taps, ctx_count, anchor, key, sampling: SamplingConfig = SamplingConfig(),
                head_hv: jax.Array | None = None):
        """Proposes one block per row (spec §4.2-4.3): backbone, then sequential Markov sampling.

        Slot 0 uses the anchor as its previous token; each later slot uses the token sampled before it.
        ``head_hv``: optionally ``self.decode_head()``, made once per decode loop (same logits, cheaper on CPU).
        Returns a :class:`Proposal`; its cache's lengths cover the context only (with the Pallas kernel the
        block's keys sit past the length as scratch).
        """
        out, cache = self.block_hidden(cache, ctx_taps, ctx_count, anchor)
        base = self.base_logits(out, head_hv)                                               # [B, Bs, V]
        bs = self.config.block_size
        keys = split_keys(key, bs)                      # [Bs] or [Bs, B] (row keys)
        head = self.markov_head

        def body(carry, xs):
            prev, state = carry
            h_k, base_k, key_k = xs
            logits = base_k
            if head is not None:
                u, state = head.step(h_k, prev, state)
                logits = logits + head.bias(u)
            logits = self.restrict_vocab(logits)
            tok = sample_tokens(logits, key_k, sampling)
            return (tok, state), (tok, logits, prev)

        rank = self.config.markov_rank if head is not None else 1
        init = (anchor.astype(jnp.int32), jnp.zeros((anchor.shape[0], rank), self.dtype))
        _, (toks, logits, prevs) = jax.lax.scan(
            body, init, (jnp.moveaxis(out, 1, 0), jnp.moveaxis(base, 1, 0), keys), unroll=True)
        toks, logits, prevs = jnp.moveaxis(toks, 0, 1), jnp.moveaxis(logits, 0, 1), jnp.moveaxis(prevs, 0, 1)
        return Proposal(tokens=toks, logits=logits, confidence_logits=self.confidence(out, prevs),
                        block_hidden=out, cache=cache)

    # ---- the decode loop's interface (drafts/common.py) ---------------------------------------------------
    def loop_state_after_prompt(self, cache: KVCache, taps, ids, lengths, first) -> BlockDraftState:
        """The prompt's taps ``[B, P, Lt*H]`` become context (the block output is unused); nothing pending."""
        bs = self.config.block_size
        _, cache = self.block_hidden(cache, taps, lengths, first)
        return BlockDraftState(cache, jnp.zeros((ids.shape[0], bs + 1, taps.shape[-1]), taps.dtype),
                               jnp.zeros_like(lengths))

    def propose_round(self, state: BlockDraftState, anchor, key, sampling, stop_ids, head_hv=None) -> RoundProposal:
        prop = self.propose(state.cache, state.pending, state.count, anchor, key, sampling, head_hv=head_hv)
        return RoundProposal(prop.tokens, prop.logits, prop.confidence_logits, None, prop.cache)

    def absorb_commit(self, state: BlockDraftState, cache_after, verify_taps, committed, n_rows,
                      active) -> BlockDraftState:
        """The verified rows ``0..n_rows-1`` (x_start and the accepted drafts) wait as pending context."""
        cache = cache_after.with_lengths(jnp.where(active, cache_after.lengths, state.cache.lengths))
        return BlockDraftState(cache, jnp.where(active[:, None, None], verify_taps, state.pending),
                               jnp.where(active, n_rows, state.count))

    def context_lengths(self, state: BlockDraftState):
        return state.cache.lengths, state.count

    def loop_head(self) -> jax.Array:
        """The base logits are ``B * Bs`` rows per round: contract them against a ``[H, V]`` copy made once."""
        return self.decode_head()

    def plain_tap_buffer(self, state: BlockDraftState, extra: int):
        """-> (buffer ``[B, P + extra, Lt*H]`` holding the pending taps first, their count ``[B]``): plain decoding
        steps append their anchors' taps after them."""
        pend = state.pending
        buf = jnp.zeros((pend.shape[0], pend.shape[1] + extra, pend.shape[2]), pend.dtype)
        return buf.at[:, :pend.shape[1]].set(pend), state.count

    def absorb_plain_run(self, state: BlockDraftState, buffer, count, anchor) -> BlockDraftState:
        """Ingests a plain run's buffered taps in one context pass (the block output is unused): the cache then
        holds every committed position but the anchor."""
        _, cache = self.block_hidden(state.cache, buffer, count, anchor)
        return BlockDraftState(cache, jnp.zeros_like(state.pending), jnp.zeros_like(state.count))


REMAT_POLICIES: dict[str, str] = {
    "none": "every layer's activations are kept for the backward pass (fastest, most memory)",
    "dots": "each layer keeps its projection / MLP matmul outputs; attention scores, softmax and elementwise "
            "temporaries are recomputed (the [heads, queries, keys] arrays are never kept)",
    "layers": "each layer keeps only its input (the block hidden state); the whole layer is recomputed",
}
"""Rematerialisation policies of the draft layers in training (``optim.remat``), cheapest memory last."""


def _layer_call(remat: str):
    """``(layer, *args) -> layer(*args)``, under ``nnx.remat`` with the policy named ``remat``."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
    call = lambda layer, *args: layer(*args)  # noqa: E731
    if remat == "none":
        return call
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return nnx.remat(call, policy=policy)


def _check_shape(name: str, x, want: tuple) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(want)}")
