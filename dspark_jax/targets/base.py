"""What every target family shares: the output type, the tokenizer attachment, tap checks and assembly, and the
forward plumbing of a plain stack of decoder layers (input checks, masks, prompt pass into a fresh cache, ragged
flat verification), so a new family is its layers.

The contract the decode loop, the drafts and the trainer rely on (``TargetBase`` + ``StackedTarget``):
``config`` (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``max_position_embeddings``,
``eos_token_ids``), ``dtype``, ``embed_tokens`` / ``lm_head`` (None when tied), ``embed``, ``compute_logits``,
``init_cache``, ``__call__``, ``prefill``, ``forward_flat``, ``check_tap_layer_ids``, ``tokenizer``.

A ``StackedTarget`` subclass provides ``embed_tokens``, ``layers``, ``norm``, ``lm_head``, ``rope(positions)`` and
``init_cache``; each layer provides ``layer(h, cos, sin, kv, start, mask) -> (h, (k, v))`` (``kv`` None: attend within
the new tokens and return their raw entries; else write at ``start`` and return the updated buffers) and
``layer.flat_call(h, cos, sin, kv, row, pos, layout) -> (h, (k, v))``.

Profile names (``jax.named_scope``): ``embed`` and ``lm_head`` here; ``qkv``, ``attention``, ``o_proj``, ``mlp``,
``moe_router``, ``moe_experts`` in the layers (``nn/`` and the family modules).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import KVCache, causal_cache_mask
from dspark_jax.nn.host import HostAttachment
from dspark_jax.nn.segments import causal_segment_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetOutput:
    """What a target forward returns.

    logits: ``[B, S, V]`` (or ``[B, K, V]`` at ``logits_at`` indices; None if not asked for).
    taps: ``[B, S, Lt*H]`` tapped hidden states in ``tap_layer_ids`` order (None if no taps).
    last_hidden: ``[B, S, H]`` final post-norm hidden state.
    cache: the updated KV cache (None when called without one).
    """

    logits: jax.Array | None
    taps: jax.Array | None
    last_hidden: jax.Array
    cache: KVCache | None


def check_flat_inputs(input_ids: jax.Array, row: jax.Array, pos: jax.Array) -> None:
    """The ``forward_flat`` contract: ``input_ids``, ``row`` and ``pos`` are equal ``[T]`` vectors."""
    if input_ids.ndim != 1 or row.shape != input_ids.shape or pos.shape != input_ids.shape:
        raise ValueError(f"input_ids/row/pos must be equal [T] vectors, got {input_ids.shape}, {row.shape}, "
                         f"{pos.shape}")


class TargetBase(nnx.Module):
    """Tokenizer attachment and tap handling, shared by every family."""

    _host: HostAttachment

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (or None); kept out of the jit cache key."""
        return self._host.obj

    def attach_tokenizer(self, tokenizer) -> None:
        """Sets ``.tokenizer`` (not a plain attribute assignment: nnx would record it in the graph)."""
        self._host.obj = tokenizer

    def check_tap_layer_ids(self, tap_layer_ids: Sequence[int]) -> tuple[int, ...]:
        ids = tuple(int(i) for i in tap_layer_ids)
        n = self.config.num_hidden_layers
        bad = [i for i in ids if not -1 <= i < n]
        if bad:
            raise ValueError(f"tap_layer_ids {bad} outside [-1, {n}) for a {n}-layer target")
        return ids

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., H]`` post-norm hidden -> ``[..., V]`` logits."""
        with jax.named_scope("lm_head"):
            if self.lm_head is None:
                return self.embed_tokens.attend(hidden)
            return self.lm_head(hidden)

    @staticmethod
    def _prompt_shape(input_ids: jax.Array, capacity: int, num_new: jax.Array | None):
        """A prompt pass's checks: ``input_ids [B, S]`` that fit ``capacity`` -> (B, S, lengths ``[B]``)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if capacity < s:
            raise ValueError(f"cache capacity {capacity} < {s} prompt tokens")
        return b, s, jnp.full((b,), s, jnp.int32) if num_new is None else num_new.astype(jnp.int32)

    def _output(self, last_hidden, tapped: dict, taps_wanted: tuple[int, ...], logits_at, return_logits,
                cache) -> TargetOutput:
        """Assembles a :class:`TargetOutput` from the post-norm hidden ``[B, S, H]`` and the tapped layers."""
        taps = jnp.concatenate([tapped[i] for i in taps_wanted], axis=-1) if taps_wanted else None
        logits = None
        if return_logits:
            hid = last_hidden if logits_at is None else jnp.take_along_axis(last_hidden, logits_at[..., None], 1)
            logits = self.compute_logits(hid)
        return TargetOutput(logits=logits, taps=taps, last_hidden=last_hidden, cache=cache)


class StackedTarget(TargetBase):
    """A causal LM that is embed -> decoder layers (one RoPE table, one causal mask) -> norm -> LM head."""

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[...]`` token ids -> ``[..., H]`` embeddings."""
        with jax.named_scope("embed"):
            return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array, cache: KVCache | None = None, *, num_new: jax.Array | None = None,
                 tap_layer_ids: Sequence[int] = (), logits_at: jax.Array | None = None,
                 return_logits: bool = True, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> TargetOutput:
        """Runs the target.

        Args:
          input_ids: ``[B, S]`` int token ids. Without a cache, row ``b`` token ``i`` sits at position ``i``
            (right padding is harmless: attention is causal). With a cache, it sits at
            ``cache.lengths[b] + i``.
          cache: a :class:`KVCache` to extend; the returned cache has ``lengths + num_new``.
          num_new: ``[B]`` how many of the S tokens are real per row (default S); the rest are padding
            whose keys are written but left beyond the row's length, so they are never attended to.
          tap_layer_ids: decoder-layer ids to tap: ``l`` = output of layer ``l`` (HF ``hidden_states[l+1]``),
            ``-1`` = the embeddings (HF ``hidden_states[0]``).
          logits_at: optional ``[B, K]`` sequence indices: logits only there (saves the ``[B,S,V]`` matmul).
          return_logits: False skips the LM head.
          segment_ids, positions: ``[B, S]`` packed rows (no cache): attention stays within runs of equal
            segment ids and token ``i`` sits at RoPE position ``positions[b, i]`` (restarting per sequence), so
            each packed sequence gets the features it would get alone.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if cache is None:
            mask = jnp.tril(jnp.ones((s, s), bool))[None] if segment_ids is None else causal_segment_mask(segment_ids)
            return self._forward(input_ids, None, jnp.zeros((b,), jnp.int32), mask, None, tap_layer_ids, logits_at,
                                 return_logits, positions=positions)
        if segment_ids is not None or positions is not None:
            raise ValueError("segment_ids / positions are for a cache-less forward over packed rows")
        if cache.batch != b:
            raise ValueError(f"cache batch {cache.batch} != input batch {b}")
        if cache.capacity < s:
            raise ValueError(f"cache capacity {cache.capacity} < {s} new tokens")
        start = cache.lengths
        grow = jnp.full((b,), s, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
        return self._forward(input_ids, cache, start, causal_cache_mask(start, s, cache.capacity), start + grow,
                             tap_layer_ids, logits_at, return_logits)

    def prefill(self, input_ids: jax.Array, capacity: int, *, num_new: jax.Array | None = None,
                tap_layer_ids: Sequence[int] = (), logits_at: jax.Array | None = None,
                return_logits: bool = True) -> TargetOutput:
        """Runs a prompt batch into a fresh KV cache of ``capacity`` slots.

        Same result as ``self(input_ids, self.init_cache(B, capacity), ...)``, but attention covers only the
        prompt's own ``[S, S]`` causal block instead of ``[S, capacity]`` against an empty cache, and the keys are
        placed by one pad instead of a scatter.

        Args:
          input_ids: ``[B, S]`` right-padded prompts (row ``b`` token ``i`` at position ``i``).
          capacity: cache slots (>= S).
          num_new: ``[B]`` real tokens per row (default S): the returned cache's lengths.
          tap_layer_ids, logits_at, return_logits: as in :meth:`__call__`.
        """
        b, s, lengths = self._prompt_shape(input_ids, capacity, num_new)
        out = self._forward(input_ids, None, jnp.zeros((b,), jnp.int32), jnp.tril(jnp.ones((s, s), bool))[None],
                            None, tap_layer_ids, logits_at, return_logits, keep_kv=True)
        keys, values = out.cache
        return dataclasses.replace(out, cache=KVCache.from_prompt(keys, values, capacity, lengths, self.dtype))

    def _forward(self, input_ids, cache, start, mask, new_lengths, tap_layer_ids, logits_at, return_logits,
                 keep_kv: bool = False, positions=None) -> TargetOutput:
        """The layer stack. ``cache`` None: attention over the S new tokens only (with ``keep_kv`` the output's
        ``cache`` field holds their raw (keys, values) per layer); else keys are written at ``start`` and the
        output cache has ``new_lengths``. ``positions [B, S]``: RoPE positions (default ``start + i``)."""
        taps_wanted = self.check_tap_layer_ids(tap_layer_ids)
        s = input_ids.shape[1]
        if positions is None:
            positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        cos, sin = self.rope(positions)

        h = self.embed(input_ids)
        tapped = {-1: h} if -1 in taps_wanted else {}
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            h, (k, v) = layer(h, cos, sin, kv, start, mask)
            new_keys.append(k)
            new_values.append(v)
            if i in taps_wanted:
                tapped[i] = h
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), new_lengths)
        elif keep_kv:
            new_cache = (tuple(new_keys), tuple(new_values))
        return self._output(self.norm(h), tapped, taps_wanted, logits_at, return_logits, new_cache)

    def forward_flat(self, input_ids: jax.Array, row: jax.Array, pos: jax.Array, cache: KVCache, *,
                     tap_layer_ids: Sequence[int] = (), layout: tuple[jax.Array, int] | None = None) -> TargetOutput:
        """Runs a flattened ragged token batch through the target (verification whose cost follows the tokens
        verified, not rows x block width).

        Args:
          input_ids: ``[T]`` token ids; token ``t`` belongs to cache row ``row[t]`` (-1 = padding: no cache write,
            zero attention output) at absolute position ``pos[t]``. A row's tokens must cover its positions
            ``lengths[r] .. pos`` contiguously so causal attention sees every earlier token.
          cache: the KV cache; its ``lengths`` are returned unchanged (the caller commits lengths).
          tap_layer_ids: as in :meth:`__call__`.
          layout: optional ``(col [T], width)``: token ``t`` is column ``col[t]`` of its row in a padded
            ``[R, width]`` block; lets the XLA attention work in that layout (see ``Attention.attend_ragged``).
        Returns:
          :class:`TargetOutput` with logits ``[T, V]``, taps ``[T, Lt*H]``, last_hidden ``[T, H]``, the cache with
          the tokens' keys/values written.
        """
        check_flat_inputs(input_ids, row, pos)
        taps_wanted = self.check_tap_layer_ids(tap_layer_ids)
        pos = pos.astype(jnp.int32)
        cos, sin = self.rope(pos[None])
        h = self.embed(input_ids[None])
        tapped = {-1: h[0]} if -1 in taps_wanted else {}
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            h, (k, v) = layer.flat_call(h, cos, sin, (cache.keys[i], cache.values[i]), row, pos, layout)
            keys.append(k)
            values.append(v)
            if i in taps_wanted:
                tapped[i] = h[0]
        last_hidden = self.norm(h)[0]
        taps = jnp.concatenate([tapped[i] for i in taps_wanted], axis=-1) if taps_wanted else None
        return TargetOutput(logits=self.compute_logits(last_hidden), taps=taps, last_hidden=last_hidden,
                            cache=KVCache(tuple(keys), tuple(values), cache.lengths))
