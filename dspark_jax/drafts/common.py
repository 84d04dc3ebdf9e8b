"""What every draft family shares: frozen target vocab (embed / lm_head ``[V, H]``), RoPE tables, tap checks, and
the interface the decode loop (decode/spec_loop.py) drives every family through.

The decode loop's interface, chosen once by the draft's class (no family branches in the loop):

- ``drafts_per_round``: drafted tokens per round (DSpark / DFlash: the block size; Eagle3: ``ttt_length``);
- ``loop_state_after_prompt(cache, taps, ids, lengths, first) -> state``: the draft's per-row state after the prompt
  pass (a registered dataclass whose first field is ``cache``);
- ``propose_round(state, anchor, key, sampling, stop_ids, head_hv) -> RoundProposal``;
- ``absorb_commit(state, cache_after, verify_taps, committed, n_rows, active) -> state``: the verified rows become
  draft context;
- ``context_lengths(state) -> (cache lengths [B], pending rows [B])``: their sum is ``start`` (spec §8.12);
- ``loop_head()``: a ``[H, V]`` head made once per loop for the proposals' base logits, or None;
- ``supports_plain_runs``, ``plain_tap_buffer`` / ``absorb_plain_run``: drafts that can sit out rounds of plain
  decoding (the schedulers' switch-off) and catch up on their taps afterwards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.cache import KVCache
from dspark_jax.nn.rope import rope_cos_sin, rope_inv_freq


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundProposal:
    """What a draft proposes in one round of the decode loop, whatever its family.

    tokens ``[B, L]`` int32; logits ``[B, L, V]`` (the distributions the tokens were drawn from, before
    temperature); confidence_logits ``[B, L]`` or None (no confidence head); usable ``[B]`` int32 or None: the
    longest prefix that may be verified (Eagle3: up to its first stop token), None = all ``L``; cache: the draft
    cache after proposing (context only, as the family's ``absorb_commit`` expects it).
    """

    tokens: jax.Array
    logits: jax.Array
    confidence_logits: jax.Array | None
    usable: jax.Array | None
    cache: KVCache


class DraftBase(nnx.Module):
    """Mixin for draft modules with ``config`` (bound DraftConfig), ``dtype``, ``embed_tokens`` and ``lm_head``.

    Each family implements the decode loop's interface (module docstring); ``architectures`` names the config
    architectures a family's class accepts."""

    architectures: tuple[str, ...] = ()
    supports_plain_runs = False

    def check_architecture(self, config) -> None:
        if config.architecture not in self.architectures:
            raise ValueError(f"{type(self).__name__} is for {' / '.join(self.architectures)} configs, got "
                             f"{config.architecture!r}")

    @property
    def drafts_per_round(self) -> int:
        return self.config.drafts_per_round

    def loop_head(self) -> jax.Array | None:
        return None

    def plain_tap_buffer(self, state, extra: int):
        raise NotImplementedError(f"{type(self).__name__} cannot sit out plain decoding steps")

    def absorb_plain_run(self, state, buffer, count, anchor):
        raise NotImplementedError(f"{type(self).__name__} cannot sit out plain decoding steps")

    def init_rope(self) -> None:
        arch = self.config.arch
        inv_freq, self.rope_scaling = rope_inv_freq(arch.rope, arch.head_dim, arch.max_position_embeddings)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)

    def rope(self, positions):
        return rope_cos_sin(positions, np.asarray(self.rope_inv_freq, np.float32), self.rope_scaling)

    def embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)

    def base_logits(self, hidden: jax.Array, head_hv: jax.Array | None = None) -> jax.Array:
        """``[..., H]`` -> ``lm_head(hidden)`` ``[..., V]`` (no extra norm for Qwen3).

        ``head_hv``: the same weights laid out ``[H, V]`` (:meth:`decode_head`); same logits, faster for a
        few rows on CPU.
        """
        x = hidden.astype(self.dtype)
        if head_hv is not None:
            return x @ head_hv.astype(self.dtype)
        return jnp.einsum("...h,vh->...v", x, self.lm_head[...].astype(self.dtype))

    def decode_head(self) -> jax.Array:
        """``lm_head`` as ``[H, V]``, made once per decode loop, outside its body.

        XLA:CPU contracts a few rows against ``W[V, H]``'s last axis ~2x slower than against ``W[H, V]``
        (``[3, 128]`` rows against a ``[2048, 128]`` head: 33 us vs 16 us; a DSpark round 3-7% faster on the demo
        pair, commit 7b4eb63), and a proposal's base logits are ``B * Bs`` rows every round. The barrier keeps XLA
        from folding the transpose back into the dot.
        """
        return jax.lax.optimization_barrier(jnp.transpose(self.lm_head[...]))

    def restrict_vocab(self, logits: jax.Array) -> jax.Array:
        """``[..., V]`` proposal logits -> the same with ids outside a pruned ``draft_vocab`` at -inf, so the
        draft samples (and rejection sampling sees) the renormalised pruned distribution, as vLLM's d2t does."""
        dv = self.config.draft_vocab
        if dv is None:
            return logits
        keep = jnp.zeros((logits.shape[-1],), bool).at[jnp.asarray(dv, jnp.int32)].set(True)
        return jnp.where(keep, logits, -jnp.inf)

    def check_tap_width(self, taps: jax.Array) -> None:
        want = self.config.num_taps * self.config.arch.hidden_size
        if taps.shape[-1] != want:
            raise ValueError(f"target features have width {taps.shape[-1]} but this draft fuses "
                             f"{self.config.num_taps} taps x H={self.config.arch.hidden_size} = {want}")
