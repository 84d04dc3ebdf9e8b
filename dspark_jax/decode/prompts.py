"""Turning user prompts (token-id lists or strings) into a right-padded batch, with clear errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dspark_jax.config import next_bucket


def encode_prompts(prompts, tokenizer=None, vocab_size: int | None = None) -> list[list[int]]:
    """Validates prompts and returns token-id lists. Strings need a tokenizer."""
    if isinstance(prompts, (str, bytes)) or (isinstance(prompts, np.ndarray) and prompts.ndim == 1):
        raise TypeError("prompts must be a list of prompts (token-id lists or strings), not a single prompt")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string but the target has no tokenizer; pass token ids")
            ids = list(tokenizer.encode(p, add_special_tokens=False))
        else:
            try:
                ids = [int(t) for t in (p.tolist() if isinstance(p, np.ndarray) else p)]
            except (TypeError, ValueError):
                raise TypeError(f"prompt {i} is neither a string nor a sequence of ints: {p!r:.80}") from None
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside the vocab [0, {vocab_size})")
        out.append(ids)
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = 0, bucket: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to ``[B, P]`` (P a power-of-two bucket) and returns (ids int32, lengths int32)."""
    lengths = np.array([len(r) for r in rows], np.int32)
    width = next_bucket(int(lengths.max())) if bucket else int(lengths.max())
    ids = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


def check_request_ids(request_ids, n: int) -> np.ndarray:
    """``[n]`` int32 request ids (the sampling key of each prompt): ``request_ids`` validated, or ``0..n-1``."""
    if request_ids is None:
        return np.arange(n, dtype=np.int32)
    try:
        ids = np.asarray([int(i) for i in request_ids], np.int64)
    except (TypeError, ValueError):
        raise ValueError("request_ids must be a sequence of ints") from None
    if ids.shape != (n,):
        raise ValueError(f"request_ids has {ids.size} ids for {n} prompts")
    if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
        raise ValueError("request_ids must lie in [0, 2**31)")
    return ids.astype(np.int32)
