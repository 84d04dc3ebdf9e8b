"""The result type shared by plain and speculative generation."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class GenerationOutput:
    """tokens: ``[B, max_new_tokens]`` new tokens only, -1 after a row stops; lengths: ``[B]`` new tokens
    per row (a stop token counts). Speculative decoding also fills ``accept_lengths [B, rounds]``
    (accepted drafts + 1 per round, 0 where a row had no round; m for a round that ends on a stop token),
    ``proposal_lengths`` (L per round) and ``accepted_drafts`` (m per round)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict[str, Any]
    accept_lengths: np.ndarray | None = None
    proposal_lengths: np.ndarray | None = None
    accepted_drafts: np.ndarray | None = None
    texts: list[str] | None = None

    def token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]
