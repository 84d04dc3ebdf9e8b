"""How each draft family is trained, chosen once per run by the draft config's ``family`` (no family branches in
the step or the trainer).

An objective turns one batch's inputs into ``forward(model) -> train outputs`` and names the loss that reads them
(``loss(outputs, config, vocab_chunk=...) -> (loss, metrics)``), plus what the trainer needs to count a step's work:

- ``block`` (DSpark / DFlash, drafts/dspark.py): ``N`` anchors sampled per sequence (``fold_in(rng, step)``), one
  block of ``Bs`` slots after each; packed rows share their anchors out over their segments; ``dspark_loss``.
- ``eagle3`` (drafts/eagle3.py): the TTT forward over every position, ``ttt_length`` steps; ``eagle3_loss``; rows
  are not packed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from dspark_jax.train.anchors import sample_anchors
from dspark_jax.train.eagle3_loss import eagle3_loss
from dspark_jax.train.loss import dspark_loss


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One batch as the draft's forward sees it: ids, loss_mask ``[B, S]``; taps ``[B, S, Lt*H]``; last_hidden
    ``[B, S, H]``; attention_mask ``[B, S]`` or None; segment_ids / positions ``[B, S]`` (packed rows) or None."""

    input_ids: object
    loss_mask: object
    taps: object
    last_hidden: object
    attention_mask: object = None
    segment_ids: object = None
    positions: object = None


class BlockObjective:
    """DSpark / DFlash: anchors, blocks, the DSpark loss from hidden states (no ``[.., V]`` logits unless asked)."""

    packs_rows = True
    loss = staticmethod(dspark_loss)

    def forward(self, x: StepInputs, *, key, num_anchors: int, remat: str, materialize: bool):
        """-> (``forward(model)``, extra metrics: ``anchors_per_seq``)."""
        anchors, keep = sample_anchors(x.loss_mask, num_anchors, key, x.segment_ids)
        extra = {"anchors_per_seq": jnp.mean(jnp.sum(keep, axis=1).astype(jnp.float32))}
        packed = {} if x.segment_ids is None else dict(segment_ids=x.segment_ids, positions=x.positions)

        def forward(model):  # the loss works from the hidden states (vocab_loss_dense when unchunked)
            return model.train_forward(x.input_ids, x.loss_mask, x.taps, x.last_hidden, anchors, keep,
                                       materialize_logits=False, remat=remat, **packed)
        return forward, extra

    @staticmethod
    def trained_tokens(config, context_tokens: float, anchors_per_seq: float, rows: int) -> float:
        """Draft tokens one step trains: its blocks (anchors x block size per row)."""
        return anchors_per_seq * rows * config.block_size


class Eagle3Objective:
    """Eagle3: training-time test over every position (``ttt_length`` steps); remat does not apply."""

    packs_rows = False
    loss = staticmethod(eagle3_loss)

    def forward(self, x: StepInputs, *, key, num_anchors: int, remat: str, materialize: bool):
        def forward(model):
            return model.train_forward(x.input_ids, x.loss_mask, x.taps, x.last_hidden, x.attention_mask,
                                       materialize_logits=materialize)
        return forward, {}

    @staticmethod
    def trained_tokens(config, context_tokens: float, anchors_per_seq: float, rows: int) -> float:
        """Draft tokens one step trains: every context position, once per TTT step."""
        return context_tokens * config.ttt_length


OBJECTIVES: dict[str, Callable[[], object]] = {"block": BlockObjective, "eagle3": Eagle3Objective}
"""``DraftConfig.family`` -> the objective class."""


def objective_for(config):
    """The training objective of a draft config's family."""
    return OBJECTIVES[config.family]()


__all__ = ["StepInputs", "BlockObjective", "Eagle3Objective", "OBJECTIVES", "objective_for"]
