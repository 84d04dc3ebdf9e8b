"""Eagle3 draft as DeepSpec implements it (spec §5 "Eagle3"; DRAFT_FORMATS §1.5): ``Qwen3Eagle3Model``.

Architecture (every layer): ``x = [input_layernorm(embed(tok)) ; hidden_norm(h)]`` (width 2H) feeds q/k/v
(Qwen3 q_norm/k_norm, RoPE), attention is causal, ``o_proj`` maps back to H and the residual is the
*un-normalised* ``h``; then the usual post-attention SwiGLU block. ``logits = lm_head(norm(h))`` over the
full frozen target vocab. The first step's ``h`` is ``fc(taps)`` (5 taps -> H, no norm after fc); later
steps feed back the pre-norm output.

Token/feature pairing (training and inference alike): the target feature of position ``p`` is paired with
the token at ``p+1`` and sits at RoPE position ``p``; its output predicts the token at ``p+2``.

Training-time test (TTT), ``ttt_length`` steps. At step ``j`` position ``t`` reads token ``x[t+j+1]`` (0
past the end), hidden ``h^(j)`` (``fc(taps)`` for j=0, else the previous step's pre-norm output) at RoPE
position ``t+j``. Keys accumulate over steps: query ``t`` of step ``j`` sees step-0 keys ``<= t`` and the
keys of its own position from steps ``1..j``; with ``len`` the valid length, queries ``>= len-j`` and
step-0 keys ``>= len-j`` are masked (a fully masked row attends to nothing and gets a 0 output). This is
DeepSpec's flex-attention mask (``create_eagle3_attention_mask`` in ``deepspec/modeling/eagle3/common.py``
with ``lck = j``) and the RoPE offset ``rope_cache_step_offset`` of ``Qwen3Eagle3Model.forward``.

Inference (``deepspec/eval/eagle3/evaluator.py``) is chain drafting: step ``j`` of a chain from the last
committed row ``t`` is exactly TTT step ``j`` at position ``t`` when the drafted tokens equal the data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import kernels
from dspark_jax.cache import KVCache, causal_cache_mask, write_rows
from dspark_jax.config import TargetConfig
from dspark_jax.decode.sampling import SamplingConfig, sample_tokens, split_keys
from dspark_jax.drafts.common import DraftBase, RoundProposal
from dspark_jax.drafts.config import EAGLE3_ARCH, EAGLE3_DEEPSPEC, DraftConfig
from dspark_jax.nn.attention import Attention
from dspark_jax.nn.frozen import Frozen
from dspark_jax.nn.linear import linear
from dspark_jax.nn.mlp import SwiGLU
from dspark_jax.nn.norm import RMSNorm
from dspark_jax.nn.rope import apply_rope

EAGLE3_NUM_TAPS = 5


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3TrainOutput:
    """What :meth:`Eagle3Draft.train_forward` returns (``T = ttt_length``).

    draft_logits ``[T,B,S,V]``: ``lm_head(norm(h^(j+1)))`` per step (None unless materialised).
    target_logits ``[T,B,S,V]``: the step's target, ``lm_head(last_hidden[t+j+1])``, and all zeros (= the
      uniform distribution) where ``t+j+1 >= S`` (None unless materialised). Stop-gradient.
    position_mask ``[T,B,S]`` fp32: ``loss_mask`` with the last valid token zeroed, shifted left by ``j``.
    draft_hidden ``[T,B,S,H]`` post-norm; target_hidden ``[T,B,S,H]`` aligned ``last_hidden[t+j+1]`` (zeros
      past the end); lm_head ``[V,H]``: enough for a vocab-chunked loss.
    softcap (static): ``cap`` of ``cap * tanh(x / cap)`` on the lm_head logits (Gemma4) or None.
    """

    draft_logits: jax.Array | None
    target_logits: jax.Array | None
    position_mask: jax.Array
    draft_hidden: jax.Array
    target_hidden: jax.Array
    lm_head: jax.Array
    softcap: float | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3Proposal:
    """One drafted chain per row (field names follow :class:`dspark_jax.drafts.dspark.Proposal`).

    tokens ``[B,L]``; logits ``[B,L,V]``: raw draft logits each token was sampled from (before
    temperature); confidence_logits: always None (Eagle3 has no confidence head); block_hidden ``[B,L,H]``
    post-norm; cache: cropped back to its pre-proposal lengths; num_proposed ``[B]`` int32: ``L``, or the
    index of the first stop token + 1 (tokens after it are computed but are not part of the proposal).
    """

    tokens: jax.Array
    logits: jax.Array
    confidence_logits: jax.Array | None
    block_hidden: jax.Array
    cache: KVCache
    num_proposed: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3State:
    """An Eagle3 draft's state in the decode loop: committed positions are written into its cache right away,
    paired with the tokens that follow them; last_hidden ``[B, H]`` is the pre-norm output of the last one, which
    the next chain starts from."""

    cache: KVCache
    last_hidden: jax.Array


class Eagle3Attention(Attention):
    """Qwen3 attention whose q/k/v read the 2H-wide ``[emb ; hidden]`` input while ``o_proj`` writes H.

    ``qk_norm=False``: the Llama Eagle3 layer (SpecForge ``LlamaForCausalLMEagle3``): no q_norm/k_norm."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, eps: float = 1e-6,
                 bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
                 attention_impl: str = "auto", qk_norm: bool = True, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.attention_impl = attention_impl
        mk = lambda i, o, axes: linear(i, o, axes, bias=bias, dtype=dtype, param_dtype=param_dtype,
                                       init_std=init_std, rngs=rngs)
        self.q_proj = mk(2 * hidden, num_heads * head_dim, ("embed", "heads"))
        self.k_proj = mk(2 * hidden, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.v_proj = mk(2 * hidden, num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.o_proj = mk(num_heads * head_dim, hidden, ("heads", "embed"))
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)
            self.k_norm = RMSNorm(head_dim, eps, param_dtype=param_dtype, axis_name=None)
        else:
            self.q_norm = self.k_norm = None

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        if self.q_norm is not None:
            return super().queries(x, cos, sin)
        return apply_rope(self.q_proj(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim), cos, sin)

    def keys_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.k_norm is not None:
            return super().keys_values(x, cos, sin)
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        return apply_rope(self.k_proj(x).reshape(shape), cos, sin), self.v_proj(x).reshape(shape)

    def project_out(self, o: jax.Array) -> jax.Array:
        """Attention output ``[B,S,nh,hd]`` -> ``o_proj`` ``[B,S,H]``."""
        return self.o_proj(o.reshape(*o.shape[:2], self.num_heads * self.head_dim))


class Eagle3Layer(nnx.Module):
    """One Eagle3 decoder layer (``Qwen3Eagle3DecoderLayer``; ``llama=True``: SpecForge's ``midlayer``, a
    ``LlamaDecoderLayer`` with the same wiring but no q/k norms and bias-free projections)."""

    def __init__(self, cfg: TargetConfig, *, dtype, param_dtype, attention_impl: str = "auto", llama: bool = False,
                 rngs: nnx.Rngs):
        std, h = cfg.initializer_range, cfg.hidden_size
        self.self_attn = Eagle3Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                         eps=cfg.rms_norm_eps, bias=cfg.attention_bias and not llama, dtype=dtype,
                                         param_dtype=param_dtype, init_std=std, attention_impl=attention_impl,
                                         qk_norm=not llama, rngs=rngs)
        self.mlp = SwiGLU(h, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype)

    def qkv(self, emb, h, cos, sin):
        """``emb, h [B,S,H]`` -> q ``[B,S,nh,hd]``, k/v ``[B,S,nkv,hd]`` (normed, rotated)."""
        dt = emb.dtype
        x = jnp.concatenate([self.input_layernorm(emb).astype(dt), self.hidden_norm(h).astype(dt)], axis=-1)
        q = self.self_attn.queries(x, cos, sin)
        k, v = self.self_attn.keys_values(x, cos, sin)
        return q, k, v

    def finish(self, h, attn):
        """Residual on the un-normalised ``h`` plus the MLP block; ``attn`` is the o_proj output ``[B,S,H]``."""
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


def ttt_attention(q, k0, v0, kd, vd, valid_len, scale):
    """Attention of TTT step ``j`` without materialising the ``[S, (j+1)S]`` mask.

    Args:
      q: ``[B,S,nh,hd]`` step-j queries; k0, v0: ``[B,S,nkv,hd]`` step-0 keys/values.
      kd, vd: ``[B,S,j,nkv,hd]``: position t's own keys/values from steps ``1..j`` (``j`` may be 0).
      valid_len: ``[B]`` ``max(len - j, 0)``; scale: the score multiplier.
    Returns ``[B,S,nh,hd]``: query t (if ``t < valid_len``) attends to step-0 keys ``<= t`` (and
    ``< valid_len``) and to its own keys in ``kd``; other queries get exactly 0.
    """
    b, s, nh, hd = q.shape
    nkv = k0.shape[2]
    qg = q.reshape(b, s, nkv, nh // nkv, hd)
    f32 = jnp.float32
    sc0 = jnp.einsum("bsngd,btnd->bngst", qg, k0, preferred_element_type=f32) * scale
    scd = jnp.einsum("bsngd,bsjnd->bngsj", qg, kd, preferred_element_type=f32) * scale
    pos = jnp.arange(s)
    q_ok = pos[None, :] < valid_len[:, None]                                              # [B,S]
    m0 = (pos[None, :, None] >= pos[None, None, :]) & (pos[None, None, :] < valid_len[:, None, None])
    m0 = m0 & q_ok[:, :, None]                                                            # [B,S,S]
    md = jnp.broadcast_to(q_ok[:, :, None], (b, s, kd.shape[2]))                          # [B,S,j]
    mask = jnp.concatenate([m0, md], axis=-1)[:, None, None]                              # [B,1,1,S,S+j]
    scores = jnp.concatenate([sc0, scd], axis=-1)
    scores = jnp.where(mask, scores, jnp.finfo(f32).min)
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.where(mask, jnp.exp(scores), 0.0)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    probs = (unnorm / jnp.where(denom > 0, denom, 1.0)).astype(v0.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs[..., :s], v0, preferred_element_type=f32)
    out = out + jnp.einsum("bngsj,bsjnd->bsngd", probs[..., s:], vd, preferred_element_type=f32)
    return out.reshape(b, s, nh, hd).astype(q.dtype)


def shift_left(x: jax.Array, n: int, fill=0) -> jax.Array:
    """``out[:, t] = x[:, t+n]`` (``fill`` past the end), along axis 1."""
    if n == 0:
        return x
    pad = jnp.full((x.shape[0], min(n, x.shape[1])) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, n:], pad], axis=1)


class Eagle3Draft(DraftBase):
    """DeepSpec ``Qwen3Eagle3Model`` (1 layer in released configs; any ``num_draft_layers`` works here).

    ``config.eagle3_variant == "llama"``: SpecForge's ``LlamaForCausalLMEagle3`` (no q/k norms, bias-free
    attention, any number of taps; its pruned ``[Vd, H]`` lm_head is held scattered into ``[V, H]`` with the
    draft vocabulary in ``config.draft_vocab``, which proposals are restricted to)."""

    architectures = (EAGLE3_ARCH,)
    norm_class = RMSNorm     # a family variant (Gemma4) swaps the norm and, via make_layer, the layer

    def make_layer(self, arch, **kwargs):
        return Eagle3Layer(arch, llama=self.config.eagle3_variant != EAGLE3_DEEPSPEC, **kwargs)

    def __init__(self, config: DraftConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str = "auto",
                 rngs: nnx.Rngs | None = None):
        if config.arch is None:
            raise ValueError("DraftConfig.arch is unset: use dj.build_draft(target, config) or config.bind(target)")
        self.check_architecture(config)
        llama = config.eagle3_variant != EAGLE3_DEEPSPEC
        if config.num_taps != EAGLE3_NUM_TAPS and not llama:
            raise ValueError(f"Eagle3 expects exactly {EAGLE3_NUM_TAPS} target_layer_ids, got "
                             f"{list(config.target_layer_ids)}")
        if any(i < 0 for i in config.target_layer_ids):
            raise ValueError(f"Eagle3 target_layer_ids may not include -1, got {list(config.target_layer_ids)}")
        if config.ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {config.ttt_length}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        arch = config.arch
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.attention_impl = attention_impl
        h, v, std = arch.hidden_size, arch.vocab_size, arch.initializer_range
        init = nnx.initializers.normal(std)
        self.embed_tokens = Frozen(init(rngs.params(), (v, h), param_dtype), logical_axes=("vocab", "embed"))
        self.lm_head = Frozen(init(rngs.params(), (v, h), param_dtype), logical_axes=("vocab", "embed"))
        self.fc = linear(config.num_taps * h, h, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                         init_std=std, rngs=rngs)
        self.layers = nnx.List([self.make_layer(arch, dtype=dtype, param_dtype=param_dtype,
                                                attention_impl=attention_impl, rngs=rngs)
                                for _ in range(config.num_draft_layers)])
        self.norm = self.norm_class(h, arch.rms_norm_eps, param_dtype=param_dtype)
        self.init_rope()

    # ---- shared pieces -------------------------------------------------------------------
    def project_features(self, taps: jax.Array) -> jax.Array:
        """``[B, P, 5H]`` tapped target features -> ``fc(taps)`` ``[B, P, H]`` (no norm: each layer's
        ``hidden_norm`` does it)."""
        self.check_tap_width(taps)
        return self.fc(taps.astype(self.dtype))

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Pre-norm hidden ``[..., H]`` -> ``lm_head(norm(hidden))`` ``[..., V]``."""
        return self.base_logits(self.norm(hidden))

    # ---- training --------------------------------------------------------------------------
    def train_forward(self, input_ids, loss_mask, target_hidden, target_last_hidden, attention_mask=None, *,
                      materialize_logits: bool = True) -> Eagle3TrainOutput:
        """The TTT forward of ``compute_eagle3_loss`` (``deepspec/modeling/eagle3/loss.py``).

        Args:
          input_ids, loss_mask: ``[B, S]``; target_hidden: ``[B, S, 5H]`` taps; target_last_hidden: ``[B, S, H]``
            (the target's final post-norm hidden state: ``lm_head`` of it gives the target logits).
          attention_mask: optional ``[B, S]`` 0/1 right-padding mask; only its row sums (the valid lengths)
            are used, as in DeepSpec. None = every position valid.
          materialize_logits: also return ``[T,B,S,V]`` draft/target logits (a chunked loss does not need them).
        """
        cfg = self.config
        b, s = input_ids.shape
        h_dim = cfg.arch.hidden_size
        _check_shape("target_hidden", target_hidden, (b, s, cfg.num_taps * h_dim))
        _check_shape("target_last_hidden", target_last_hidden, (b, s, h_dim))
        _check_shape("loss_mask", loss_mask, (b, s))
        if attention_mask is None:
            lengths = jnp.full((b,), s, jnp.int32)
        else:
            _check_shape("attention_mask", attention_mask, (b, s))
            lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

        h = self.project_features(target_hidden)
        n_layers = len(self.layers)
        k0 = [None] * n_layers
        v0 = [None] * n_layers
        kd = [[] for _ in range(n_layers)]
        vd = [[] for _ in range(n_layers)]
        outs = []
        for j in range(cfg.ttt_length):
            emb = self.embed(shift_left(input_ids, j + 1))
            cos, sin = self.rope(pos + j)
            valid = jnp.maximum(lengths - j, 0)
            x = h
            for li, layer in enumerate(self.layers):
                q, k, v = layer.qkv(emb, x, cos, sin)
                if j == 0:
                    k0[li], v0[li] = k, v
                else:
                    kd[li].append(k)
                    vd[li].append(v)
                empty = jnp.zeros((b, s, 0) + k.shape[2:], k.dtype)
                kd_j = jnp.stack(kd[li], axis=2) if kd[li] else empty
                vd_j = jnp.stack(vd[li], axis=2) if vd[li] else empty
                o = ttt_attention(q, k0[li], v0[li], kd_j, vd_j, valid, layer.self_attn.scale)
                x = layer.finish(x, layer.self_attn.project_out(o))
            h = x
            outs.append(self.norm(h))
        draft_hidden = jnp.stack(outs)                                                     # [T,B,S,H]

        # position mask: loss_mask, last valid token zeroed, shifted left by j
        last = jnp.maximum(lengths - 1, 0)
        mask0 = loss_mask.astype(jnp.float32) * (pos != last[:, None])
        position_mask = jnp.stack([shift_left(mask0, j) for j in range(cfg.ttt_length)])
        # target at step j, position t: last_hidden[t+j+1]; zeros past the end (-> uniform distribution)
        tl = jax.lax.stop_gradient(target_last_hidden.astype(self.dtype))
        target_h = jnp.stack([shift_left(tl, j + 1) for j in range(cfg.ttt_length)])      # [T,B,S,H]
        draft_logits = target_logits = None
        if materialize_logits:
            draft_logits = self.base_logits(draft_hidden)
            target_logits = jax.lax.stop_gradient(self.base_logits(target_h))
        return Eagle3TrainOutput(draft_logits=draft_logits, target_logits=target_logits,
                                 position_mask=position_mask, draft_hidden=draft_hidden, target_hidden=target_h,
                                 lm_head=self.lm_head[...])

    # ---- inference -------------------------------------------------------------------------
    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        """An empty cache. Capacity must cover every committed position plus ``ttt_length - 1`` chain rows."""
        a = self.config.arch
        return KVCache.create(self.config.num_draft_layers, batch, capacity, a.num_key_value_heads, a.head_dim,
                              dtype or self.dtype)

    def forward_cached(self, cache: KVCache, hidden: jax.Array, tokens: jax.Array, count: jax.Array):
        """Runs rows ``(hidden, tokens)`` at positions ``cache.lengths + i`` with causal attention over the cache.

        Args:
          hidden: ``[B, P, H]`` pre-norm hidden inputs (``fc(taps)`` or a previous output); tokens ``[B, P]``.
          count: ``[B]`` real rows per batch row (rows ``>= count`` are padding: their keys land past the new
            length and stay invisible).
        Returns: (cache with lengths ``+ count``, pre-norm outputs ``[B, P, H]``).
        """
        start = cache.lengths
        p = tokens.shape[1]
        cos, sin = self.rope(start[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :])
        mask = causal_cache_mask(start, p, cache.capacity)
        emb = self.embed(tokens)
        x = hidden.astype(self.dtype)
        keys, values = [], []
        for li, layer in enumerate(self.layers):
            q, k, v = layer.qkv(emb, x, cos, sin)
            kb = write_rows(cache.keys[li], k, start)
            vb = write_rows(cache.values[li], v, start)
            o = kernels.attention(q, kb, vb, mask, layer.self_attn.scale, impl=self.attention_impl)
            x = layer.finish(x, layer.self_attn.project_out(o))
            keys.append(kb)
            values.append(vb)
        return KVCache(tuple(keys), tuple(values), start + count.astype(jnp.int32)), x

    def extend(self, cache: KVCache, features: jax.Array, tokens: jax.Array, count: jax.Array,
               prev_hidden: jax.Array | None = None):
        """Appends committed positions to the draft cache (DeepSpec's ``extend_draft_cache``).

        Row ``i`` pairs the target feature of position ``p = cache.lengths + i`` with the token at ``p+1``:
        - prompt of ``n`` tokens: ``features = taps[0..n-1]``, ``tokens = [x_1 .. x_{n-1}, x_n]`` where ``x_n``
          is the first token sampled from the target (so the cache then has length ``n = start``);
        - after a round that accepted ``m`` drafts: ``features`` = taps of verify rows ``0..m`` (``x_start``
          and the accepted drafts), ``tokens`` = the ``m+1`` committed tokens (accepted + bonus),
          ``count = m+1``, on the cache as :meth:`propose` returned it (cropped).

        Args: features ``[B, P, 5H]``; tokens ``[B, P]``; count ``[B]``; prev_hidden ``[B, H]``: kept where
          ``count == 0`` (None: zeros there).
        Returns: (cache, last_hidden ``[B, H]``): the pre-norm output of the last real row, which
          :meth:`propose` turns into the first draft token.
        """
        count = count.astype(jnp.int32)
        cache, out = self.forward_cached(cache, self.project_features(features), tokens, count)
        last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
        if prev_hidden is None:
            prev_hidden = jnp.zeros_like(last)
        return cache, jnp.where((count > 0)[:, None], last, prev_hidden.astype(last.dtype))

    def propose(self, cache: KVCache, last_hidden: jax.Array, key: jax.Array,
                sampling: SamplingConfig = SamplingConfig(), *, num_tokens: int | None = None,
                stop_token_ids: tuple[int, ...] = (), forced_tokens: jax.Array | None = None) -> Eagle3Proposal:
        """Chain-drafts ``L = num_tokens or ttt_length`` tokens per row, one forward per token after the first.

        Token 0 comes from ``lm_head(norm(last_hidden))``; token k >= 1 from a forward of
        ``(h_{k-1}, token_{k-1})`` at position ``c + k - 1`` (``c = cache.lengths = start``), written to the
        cache and attending to everything before it. Afterwards the cache is cropped back to ``c``.

        Early stop: shapes are static, so every row always drafts ``L`` tokens; ``num_proposed`` marks the
        first stop token (``stop_token_ids``), after which DeepSpec stops drafting.
        ``forced_tokens [B, L]`` replaces the sampled tokens (teacher forcing, for tests).
        """
        n = self.config.ttt_length if num_tokens is None else int(num_tokens)
        if n < 1:
            raise ValueError(f"num_tokens must be >= 1, got {n}")
        b = last_hidden.shape[0]
        c0 = cache.lengths
        keys = split_keys(key, n)                       # [n] or [n, B] (row keys)
        forced = forced_tokens.astype(jnp.int32) if forced_tokens is not None else None

        h0 = last_hidden.astype(self.dtype)
        n0 = self.norm(h0)
        logits0 = self.restrict_vocab(self.base_logits(n0))
        tok0 = forced[:, 0] if forced is not None else sample_tokens(logits0, keys[0], sampling)

        def body(carry, i):
            cache, h, tok = carry
            cache, out = self.forward_cached(cache, h[:, None], tok[:, None], jnp.ones((b,), jnp.int32))
            h = out[:, 0]
            normed = self.norm(h)
            logits = self.restrict_vocab(self.base_logits(normed))
            t = (jnp.take(forced, i, axis=1) if forced is not None
                 else sample_tokens(logits, jnp.take(keys, i, axis=0), sampling))
            return (cache, h, t), (t, logits, normed)

        toks, logits, normed = tok0[:, None], logits0[:, None], n0[:, None]
        if n > 1:
            (cache, _, _), (t_s, l_s, n_s) = jax.lax.scan(body, (cache, h0, tok0), jnp.arange(1, n))
            toks = jnp.concatenate([toks, jnp.moveaxis(t_s, 0, 1)], axis=1)
            logits = jnp.concatenate([logits, jnp.moveaxis(l_s, 0, 1)], axis=1)
            normed = jnp.concatenate([normed, jnp.moveaxis(n_s, 0, 1)], axis=1)
        num = jnp.full((b,), n, jnp.int32)
        if stop_token_ids:
            is_stop = jnp.isin(toks, jnp.asarray(stop_token_ids, jnp.int32))
            first = jnp.argmax(is_stop, axis=1).astype(jnp.int32)
            num = jnp.where(is_stop.any(axis=1), first + 1, num)
        return Eagle3Proposal(tokens=toks, logits=logits, confidence_logits=None, block_hidden=normed,
                              cache=cache.with_lengths(c0), num_proposed=num)

    # ---- the decode loop's interface (drafts/common.py) ---------------------------------------------------
    def loop_state_after_prompt(self, cache: KVCache, taps, ids, lengths, first) -> Eagle3State:
        """Position ``p`` of the prompt is paired with the token at ``p+1``; the last one with ``first``."""
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        nxt = jnp.where(jnp.arange(ids.shape[1])[None, :] == (lengths - 1)[:, None], first[:, None], nxt)
        return Eagle3State(*self.extend(cache, taps, nxt, lengths))

    def propose_round(self, state: Eagle3State, anchor, key, sampling, stop_ids, head_hv=None) -> RoundProposal:
        prop = self.propose(state.cache, state.last_hidden, key, sampling, stop_token_ids=stop_ids)
        return RoundProposal(prop.tokens, prop.logits, None, prop.num_proposed, prop.cache)

    def absorb_commit(self, state: Eagle3State, cache_after, verify_taps, committed, n_rows, active) -> Eagle3State:
        """The verified rows' taps are written into the cache at once, each paired with the committed token after
        it."""
        cache, last = self.extend(cache_after, verify_taps, jnp.maximum(committed, 0), n_rows, state.last_hidden)
        cache = cache.with_lengths(jnp.where(active, cache.lengths, state.cache.lengths))
        return Eagle3State(cache, jnp.where(active[:, None], last, state.last_hidden))

    def context_lengths(self, state: Eagle3State):
        return state.cache.lengths, jnp.zeros_like(state.cache.lengths)


def _check_shape(name: str, x, want: tuple) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(want)}")
