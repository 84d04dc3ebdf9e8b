"""The jitted training step: frozen target -> online features -> draft forward -> loss -> optax update.

State is split the nnx way (DESIGN §3): the draft's ``graphdef`` is static (captured by
:func:`make_train_step`), its ``nnx.Param`` variables are the trainable ``params``, and everything else
(``Frozen`` embed/lm_head) is ``frozen``: carried in the :class:`TrainState` and checkpointed, but never
differentiated, never in the optimizer state, and returned untouched (bit-identical) by every step. The target
is frozen too; its state is an argument of the step (not part of the train state) and its outputs pass through
``stop_gradient``.

One call of the step function is one *micro-step* on one global batch::

    batch = {"input_ids": [B, S] int32, "loss_mask": [B, S]  (+ optional "attention_mask": [B, S] or
             "lengths": [B] for Eagle3; + optional cached features "target_hidden_states" [B,S,Lt*H],
             "target_last_hidden_states" [B,S,H], which replace step 1; + for packed rows "segment_ids" and
             "positions" [B, S] int32, see below)}
    1. target(input_ids, tap_layer_ids=draft.config.target_layer_ids) -> taps [B,S,Lt*H], last_hidden [B,S,H]
       (the "online features" of spec §3.2, computed in the step instead of read from a cache)
    2. DSpark / DFlash: anchors from sample_anchors(loss_mask, N, fold_in(rng, step)); train_forward; dspark_loss
       Eagle3: train_forward (TTT); eagle3_loss (the family's objective, train/objectives.py, chosen once)
    3. grads w.r.t. params only; optimizer.update (with optax.MultiSteps it accumulates and updates every k-th call)

Packed rows (``data.packing``, DSpark / DFlash only): a batch with ``segment_ids`` holds several conversations
per row. The target's causal forward, the draft's block attention and the labels stay inside a segment, RoPE
positions are ``positions`` (restarting per conversation), and the row's ``N`` anchors are shared out over its
segments (:func:`~dspark_jax.train.anchors.sample_anchors`). Padding is a segment of its own with no loss.

The loss is normalised over the whole global batch inside the one jitted program (``sum w`` runs over every
sequence on every device), which is spec §3.4's all-reduced ``Wsum`` per micro-step; ``optax.MultiSteps``
averages micro-steps, which is DeepSpec's ``/ grad_accum``.

Sharding (DESIGN §3): with a ``mesh``, parameters, optimizer moments and frozen arrays are placed by their
``logical_axes`` metadata through :func:`~dspark_jax.sharding.sharding_fn` (the optimizer's ``mu``/``nu``
and accumulated gradients are ``nnx.Param`` trees with the same metadata, so they shard like the parameters);
scalars and the rng are replicated; batch arrays shard their batch dimension over ``("data", "fsdp")``; the
target's parameters follow the same rules. The mesh axes are ``Auto``, so XLA propagates these shardings
through the unannotated model code; the target's features are pinned to the batch sharding. The step's
output state is pinned (``out_shardings``) to the input placement, so state stays put from step to step.

Precision: the step computes in whatever dtypes the modules were built with. Tests run everything in fp32
(params and compute), where one step agrees across mesh shapes to ~1e-6. The trainer's default
(``optim.precision: bf16``) is our equivalent of DeepSpec's ``BF16Optimizer`` + FSDP bf16 mixed precision: the
draft is built with ``param_dtype=float32`` (the parameters *are* the fp32 master copy; Adam moments fp32) and
``dtype=bfloat16`` (every matmul casts its weight to bf16 and runs in bf16), the loss's softmaxes run in fp32,
and the target runs in bf16. There is no second bf16 copy of the weights to keep in sync; the cost is fp32
parameter memory for the (small) draft, the saving is one fewer copy and no copy-back step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dspark_jax.drafts.dspark import REMAT_POLICIES
from dspark_jax.sharding import LogicalRules, sharding_fn
from dspark_jax.train.objectives import StepInputs, objective_for
from dspark_jax.train.schedule import optimizer_update_count

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""

FEATURE_KEYS: tuple[str, str] = ("target_hidden_states", "target_last_hidden_states")
"""Batch keys of precomputed target features (DeepSpec's cache names): taps ``[B,S,Lt*H]``, last ``[B,S,H]``."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run carries from step to step (a pytree; no graphdef inside).

    params: ``nnx.State`` of the draft's ``nnx.Param`` variables (trained).
    frozen: ``nnx.State`` of the draft's other variables (``Frozen`` embed/lm_head): never updated.
    opt_state: the optax state for ``params`` (no entry for ``frozen``).
    step: int32 scalar, micro-steps taken (= calls of the step function; resume data at this count).
    rng: uint32 raw PRNG key data (``jax.random.key_data``); step ``s`` draws from ``fold_in(rng, s)``.
    """

    params: Any
    frozen: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def split_draft(draft: nnx.Module):
    """``draft -> (graphdef, params, frozen)``: ``nnx.Param`` variables vs everything else."""
    graphdef, params, frozen = nnx.split(draft, nnx.Param, ...)
    return graphdef, params, frozen


def init_train_state(draft: nnx.Module, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh :class:`TrainState` for ``draft`` (arrays copied, so donating the state in the step never
    invalidates the module's own arrays)."""
    _, params, frozen = split_draft(draft)
    params = jax.tree.map(jnp.copy, params)
    frozen = jax.tree.map(jnp.copy, frozen)
    return TrainState(params=params, frozen=frozen, opt_state=optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)))


def abstract_train_state(draft: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
    """The :class:`TrainState` of ``draft`` as ``ShapeDtypeStruct`` leaves (no memory allocated)."""
    return jax.eval_shape(lambda: init_train_state(draft, optimizer, 0))


# ---- sharding -------------------------------------------------------------------------------------------
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def logical_shardings(tree, mesh: Mesh, rules: LogicalRules | None = None):
    """A tree like ``tree`` (concrete or abstract) with a :class:`NamedSharding` in place of each array.

    A ``nnx.Variable`` with ``logical_axes`` metadata is sharded by ``rules`` (the variable node is kept, its
    value replaced by the sharding, so the result has exactly ``tree``'s structure); every other leaf
    (counts, the step, the rng) is replicated.
    """
    fn = sharding_fn(mesh, rules or LogicalRules())
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        if _is_variable(x):
            axes = x.get_metadata().get("logical_axes")
            return x.replace(value=fn(_path_str(path), tuple(x.get_value().shape), axes))
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
    """Batch-dimension sharding over ``("data", "fsdp")`` (checks ``batch_size`` divides when given)."""
    ways = 1
    for a in BATCH_AXES:
        ways *= mesh.shape.get(a, 1)
    if batch_size is not None and batch_size % ways:
        raise ValueError(f"batch size {batch_size} is not divisible by the {ways} ways of mesh axes {BATCH_AXES} "
                         f"(mesh {dict(mesh.shape)})")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_batch_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """Rows of a ``[batch_size, ...]`` global batch that this process's devices hold under
    :func:`batch_sharding`, ascending: the rows this process must load so that the global batch (and so every
    per-row random draw) is the same whatever the number of processes."""
    indices = batch_sharding(mesh, batch_size).addressable_devices_indices_map((batch_size,))
    rows = {r for index in indices.values() for r in range(*index[0].indices(batch_size))}
    return np.asarray(sorted(rows), np.int64)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """Places every ``[B, ...]`` array of ``batch`` with its batch dimension over ``("data", "fsdp")``.

    Host (numpy) arrays are the global batch on one process; with several processes they are this process's
    rows, :func:`process_batch_rows` in that order (``jax.make_array_from_process_local_data`` maps them onto
    the local devices' slices), so each host feeds only its own share."""
    out = {}
    multi = jax.process_count() > 1
    for k, v in batch.items():
        if isinstance(v, jax.Array):
            out[k] = jax.device_put(v, batch_sharding(mesh, v.shape[0]))
        elif multi:
            out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(v))
        else:
            v = np.asarray(v)
            out[k] = jax.device_put(v, batch_sharding(mesh, v.shape[0]))
    return out


def shard_train_state(state: TrainState, mesh: Mesh, rules: LogicalRules | None = None) -> TrainState:
    """Places a :class:`TrainState` on ``mesh``: params / moments / frozen by logical axes, the rest replicated."""
    return jax.device_put(state, logical_shardings(state, mesh, rules))


def shard_target_state(target_state, mesh: Mesh, rules: LogicalRules | None = None):
    """Places the target's ``nnx.State`` (``nnx.split(target)[1]``) on ``mesh`` by the same logical-axis rules."""
    return jax.device_put(target_state, logical_shardings(target_state, mesh, rules))


# ---- the step ---------------------------------------------------------------------------------------------
def target_features(target, input_ids, tap_layer_ids, segment_ids=None, positions=None):
    """Frozen target forward -> (taps ``[B,S,Lt*H]``, last_hidden ``[B,S,H]``), both ``stop_gradient``.
    ``segment_ids`` / ``positions`` ``[B, S]``: packed rows (attention within a segment, positions restarting)."""
    packed = {} if segment_ids is None else dict(segment_ids=segment_ids, positions=positions)
    out = target(input_ids, tap_layer_ids=tuple(tap_layer_ids), return_logits=False, **packed)
    return jax.lax.stop_gradient(out.taps), jax.lax.stop_gradient(out.last_hidden)


def make_train_step(target: nnx.Module, draft: nnx.Module, optimizer: optax.GradientTransformation, *,
                    vocab_chunk: int | None = None, mesh: Mesh | None = None, rules: LogicalRules | None = None,
                    lr_schedule: Callable | None = None, num_anchors: int | None = None,
                    donate: bool = True, compiler_options: Mapping[str, Any] | None = None,
                    remat: str = "none") -> Callable:
    """Builds ``step_fn(state, target_state, batch) -> (state, metrics)``, jitted.

    Args:
      target: the target module (only its graphdef is kept; its weights come in as ``target_state``, from
        ``nnx.split(target)[1]``, placed with :func:`shard_target_state` when using a mesh). None when every
        batch carries precomputed features (:data:`FEATURE_KEYS`, from an offline target cache); then pass
        ``target_state=None``. A batch with those keys skips the target even when one is given.
      draft: the draft module (its graphdef and config are kept; weights live in the :class:`TrainState`).
      optimizer: an optax transformation over the ``params`` tree (e.g.
        :func:`~dspark_jax.train.schedule.make_optimizer`).
      vocab_chunk: reduce the loss over the vocab in chunks of this many rows (no ``[..,V]`` logits); None
        materialises the logits.
      mesh, rules: place the batch (in the wrapper) and pin the output state to the logical-axis shardings.
        The state and target state must already be on the mesh (:func:`shard_train_state`,
        :func:`shard_target_state`). None: plain single-placement jit.
      lr_schedule: the optimizer's schedule, only to report ``metrics["lr"]`` (the rate of the next update).
      num_anchors: anchors per sequence (default ``draft.config.num_anchors``; unused by Eagle3).
      donate: donate the input state's buffers to the output (halves peak state memory; the caller must not
        reuse a state it passed in).
      remat: rematerialisation of the DSpark / DFlash draft layers (``drafts.dspark.REMAT_POLICIES``: ``none``,
        ``dots``, ``layers``); Eagle3 ignores it.
      compiler_options: passed to ``jax.jit`` (e.g. the tests' ``{"xla_llvm_disable_expensive_passes": True}``,
        which cuts CPU compile time for tiny models).
    Returns:
      ``step_fn``; metrics are fp32 scalars: ``loss``, ``grad_norm`` (of this micro-step's gradient), the loss
      function's metrics (ce, l1, bce, accept_rate@k, tau_probabilistic, ... / Eagle3's ploss_j, accuracy@j,
      ...), ``anchors_per_seq`` (DSpark), ``lr`` (with ``lr_schedule``).
    """
    cfg = draft.config
    draft_graphdef, _, _ = split_draft(draft)
    target_graphdef = None if target is None else nnx.split(target)[0]
    taps_ids = tuple(cfg.target_layer_ids)
    n_anchors = int(num_anchors or cfg.num_anchors)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
    materialize = vocab_chunk is None
    objective = objective_for(cfg)
    feature_sharding = None if mesh is None else batch_sharding(mesh)

    def step(state: TrainState, target_state, batch):
        input_ids = batch["input_ids"].astype(jnp.int32)
        loss_mask = batch["loss_mask"]
        segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
        if segment_ids is not None and not objective.packs_rows:
            raise ValueError("packed batches (segment_ids) are for DSpark / DFlash drafts, not "
                             f"{type(draft).__name__}")
        if segment_ids is not None and positions is None:
            raise ValueError("a packed batch needs 'positions' with its 'segment_ids'")
        attention_mask = batch.get("attention_mask")
        if attention_mask is None and "lengths" in batch:
            # rebuilt from lengths, as DeepSpec's collator does (only Eagle3 reads it)
            attention_mask = (jnp.arange(input_ids.shape[1])[None, :] < batch["lengths"][:, None]).astype(jnp.int32)
        if FEATURE_KEYS[0] in batch:  # offline cache: the features come with the batch
            taps = jax.lax.stop_gradient(batch[FEATURE_KEYS[0]])
            last_hidden = jax.lax.stop_gradient(batch[FEATURE_KEYS[1]])
        else:
            if target_graphdef is None:
                raise ValueError("this step was built without a target: batches must carry "
                                 f"{FEATURE_KEYS} (an offline target cache)")
            tgt = nnx.merge(target_graphdef, target_state)
            taps, last_hidden = target_features(tgt, input_ids, taps_ids, segment_ids, positions)
        if feature_sharding is not None:
            taps = jax.lax.with_sharding_constraint(taps, feature_sharding)
            last_hidden = jax.lax.with_sharding_constraint(last_hidden, feature_sharding)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs = StepInputs(input_ids, loss_mask, taps, last_hidden, attention_mask, segment_ids, positions)
        forward, extra = objective.forward(inputs, key=key, num_anchors=n_anchors, remat=remat,
                                           materialize=materialize)

        def loss_fn(params):
            model = nnx.merge(draft_graphdef, params, state.frozen)
            return objective.loss(forward(model), cfg, vocab_chunk=vocab_chunk)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = dict(metrics)
        metrics.update(extra)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(optimizer_update_count(state.opt_state)), jnp.float32)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params=params, frozen=state.frozen, opt_state=opt_state, step=state.step + 1,
                               rng=state.rng)
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    jit_kw: dict[str, Any] = dict(donate_argnums=(0,) if donate else ())
    if compiler_options:
        jit_kw["compiler_options"] = dict(compiler_options)
    if mesh is not None:
        state_shardings = logical_shardings(abstract_train_state(draft, optimizer), mesh, rules)
        jit_kw["out_shardings"] = (state_shardings, NamedSharding(mesh, PartitionSpec()))
    jitted = jax.jit(step, **jit_kw)

    def step_fn(state: TrainState, target_state, batch: Mapping[str, Any]):
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        return jitted(state, target_state, dict(batch))

    step_fn.jitted = jitted
    return step_fn


__all__ = ["TrainState", "BATCH_AXES", "split_draft", "init_train_state", "abstract_train_state", "FEATURE_KEYS",
           "logical_shardings", "batch_sharding", "process_batch_rows", "shard_batch", "shard_train_state",
           "shard_target_state", "target_features", "make_train_step"]
