"""Constructed target/draft pairs with known acceptance, for tests and benchmarks (not for training).

``make_bigram`` turns a target into one whose next-token distribution depends only on the current token
(attention and MLP outputs zeroed, so the residual stream is the token's embedding; compute is unchanged).
``make_oracle_draft`` then sets a DSpark draft's Markov head to that bigram table (W1 = identity rows,
W2 = scale * table, backbone output zeroed): at scale 1 and temperature 1, ``p_d == p_t`` exactly, so
every draft is accepted; a large scale gives a greedy oracle; scale < 1 a near miss.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_bigram(target):
    """Zeroes every layer's o_proj and down_proj in place; returns the target."""
    for layer in target.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        mlp = layer.mlp
        if hasattr(mlp, "down_proj") and hasattr(mlp.down_proj, "kernel"):
            mlp.down_proj.kernel[...] = jnp.zeros_like(mlp.down_proj.kernel[...])
        else:
            mlp.down_proj[...] = jnp.zeros_like(mlp.down_proj[...])
    return target


def bigram_table(target) -> np.ndarray:
    """``[V, V]`` logits of a bigram target (row = current token)."""
    v = target.config.vocab_size
    return np.asarray(target(jnp.arange(v)[:, None]).logits[:, 0], np.float64)


def make_cycle_target(target, order, seed: int = 0):
    """Makes ``target`` (untied Qwen3-style) a greedy cycle through ``order`` (a permutation of the vocabulary):
    after ``order[j]`` its argmax is ``order[j + 1]`` (``order[0]`` after the last), whatever came before. Output
    lengths are then set by the prompt's last token: with stop token ``order[-1]``, a prompt ending in
    ``order[-1 - L]`` generates exactly ``L`` tokens. Compute per token is unchanged (a bigram target).

    Embedding rows are random unit vectors e_t and the LM head's column for ``succ(t)`` is e_t, so the winning logit
    is ~sqrt(H) against ~|N(0, 1)| for the others."""
    cfg = target.config
    if getattr(target, "lm_head", None) is None:
        raise ValueError("make_cycle_target needs an untied LM head (tie_word_embeddings=False)")
    v, h = cfg.vocab_size, cfg.hidden_size
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(v)):
        raise ValueError(f"order must be a permutation of range({v})")
    make_bigram(target)
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((v, h))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    succ = np.empty(v, np.int64)
    succ[order] = np.roll(order, -1)
    head = np.zeros((h, v))
    head[:, succ] = e.T
    emb = target.embed_tokens.embedding
    emb[...] = jnp.asarray(e, emb[...].dtype)
    target.lm_head.kernel[...] = jnp.asarray(head, target.lm_head.kernel[...].dtype)
    return target


def make_oracle_draft(target, draft, scale: float = 1.0):
    """Writes the target's bigram table into the draft's Markov head (rank must be >= V); returns the draft."""
    v = target.config.vocab_size
    head = draft.markov_head
    if head is None or head.rank < v:
        raise ValueError(f"an oracle draft needs a Markov head of rank >= V={v}")
    draft.norm.weight[...] = jnp.zeros_like(draft.norm.weight[...])
    head.markov_w1[...] = jnp.eye(v, head.rank, dtype=head.markov_w1[...].dtype)
    w2 = np.zeros((v, head.rank), np.float32)
    w2[:, :v] = scale * bigram_table(target).T
    head.markov_w2[...] = jnp.asarray(w2, head.markov_w2[...].dtype)
    if head.kind == "gated":  # sigmoid(30) ~ 1: the gate passes the prev embedding through
        head.gate_proj.kernel[...] = jnp.zeros_like(head.gate_proj.kernel[...])
        head.gate_proj.bias[...] = jnp.full_like(head.gate_proj.bias[...], 30.0)
    return draft


# ChatML as Qwen3 renders it without reasoning: the final assistant turn, when it answers the last user turn, opens
# with an empty think block (so training text matches what a generation prompt with enable_thinking=False
# precedes); earlier assistant turns do not.
QWEN_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.last and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def build_chat_tokenizer(corpus: list[str], size: int, template: str = QWEN_STYLE_TEMPLATE,
                         reserved: tuple[str, ...] = ()):
    """A byte-level BPE trained on ``corpus`` with Qwen-style specials (<|endoftext|>, <|im_start|>, <|im_end|>,
    <think>, </think>) and a ChatML template, padded with filler tokens to exactly ``size`` (= a target's vocab).

    ``reserved``: extra special tokens the tokenizer never produces from text (e.g. a draft's mask token), added
    right after the specials, before the fillers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size - 24 - len(reserved),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus) * 4, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    backend.add_tokens([AddedToken(t, normalized=False) for t in ["<think>", "</think>"]])
    if reserved:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in reserved])
    filler = size - backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(f"<|extra_{i}|>", normalized=False, special=True) for i in range(filler)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    if len(tok) != size:
        raise ValueError(f"tokenizer has {len(tok)} entries, wanted {size}")
    return tok
