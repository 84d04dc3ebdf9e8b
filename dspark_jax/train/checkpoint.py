"""Training checkpoints: a thin wrapper around orbax's ``CheckpointManager``.

Each checkpoint is one step directory with two items::

    <directory>/<step>/state   the TrainState pytree (params, frozen, opt_state, step, rng), orbax StandardSave
    <directory>/<step>/extra   a JSON dict (data-iterator state, epoch, config hash, ... whatever the caller wants)

Saving may be asynchronous (orbax copies the arrays to host memory before ``save`` returns, then writes in a
background thread; the train step may donate the state right after). Call :meth:`TrainCheckpointManager.wait`
or :meth:`~TrainCheckpointManager.close` (or use it as a context manager) before the process exits.

Restoring takes a *target*: a TrainState-shaped tree of ``jax.ShapeDtypeStruct`` with shardings (see
:func:`sharded_abstract_state`) or of arrays already placed where they should go. Arrays are read straight into
those shardings, so a run saved on one mesh resumes on a mesh of another shape.

Partially written checkpoints are never restored. orbax writes each step into ``<step>.orbax-checkpoint-tmp-*``
and renames it when complete (those temporary directories are ignored and cleaned up). A step directory with
a plain name but without orbax's completion files (a crash on a file system without atomic rename, a copy
cut short) would otherwise look like the newest step -- and would also block saving any step up to it -- so
on start-up such directories are renamed to ``<step>.incomplete-<unix time>`` (kept for inspection, ignored by
orbax) with a warning. Restoring the latest step also falls back to the previous complete one if reading fails.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dspark_jax.sharding import LogicalRules
from dspark_jax.train.step import TrainState, abstract_train_state, logical_shardings

log = logging.getLogger(__name__)

STATE_ITEM, EXTRA_ITEM = "state", "extra"
# any of these in a step directory means orbax finished it (the first is written by every orbax version we
# know; commit_success.txt is orbax's marker on non-atomic file systems)
_COMPLETION_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
_STEP_DIR = re.compile(r"^(0|[1-9]\d*)$")


def sharded_abstract_state(draft, optimizer, mesh: Mesh, rules: LogicalRules | None = None) -> TrainState:
    """The :class:`TrainState` of ``draft`` as ``ShapeDtypeStruct`` leaves carrying their ``mesh`` shardings
    (by logical axes, as :func:`~dspark_jax.train.step.shard_train_state` places them): a restore target."""
    abstract = abstract_train_state(draft, optimizer)
    shardings = logical_shardings(abstract, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _as_restore_target(tree):
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            raise ValueError("restore target leaf has no sharding: build the target with sharded_abstract_state() "
                             "or pass placed arrays")
        return x
    return jax.tree.map(one, tree)


def is_complete_step_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` (a ``<directory>/<step>`` folder) holds a finished checkpoint of this module."""
    path = os.fspath(path)
    if not any(os.path.exists(os.path.join(path, f)) for f in _COMPLETION_FILES):
        return False
    return all(os.path.isdir(os.path.join(path, item)) for item in (STATE_ITEM, EXTRA_ITEM))


def quarantine_incomplete_steps(directory: str | os.PathLike) -> list[str]:
    """Renames plain-named step directories that are not complete checkpoints to ``<name>.incomplete-<time>``.

    Returns the new paths. Only process 0 touches the file system; every process waits for it."""
    directory = os.fspath(directory)
    moved: list[str] = []
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if _STEP_DIR.match(name) and os.path.isdir(path) and not is_complete_step_dir(path):
                new = f"{path}.incomplete-{int(time.time())}"
                os.rename(path, new)
                log.warning("checkpoint step directory %s is incomplete (no orbax completion marker or missing "
                            "items); moved aside to %s and ignored", path, new)
                moved.append(new)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dspark_jax.checkpoint.quarantine")
    return moved


class TrainCheckpointManager:
    """Saves / restores :class:`TrainState` + a JSON dict every ``save_every`` steps, keeping ``max_to_keep``.

    Example::

        with TrainCheckpointManager(run_dir / "checkpoints", save_every=500) as ckpt:
            if ckpt.latest_step() is not None:
                state, extra = ckpt.restore(sharded_abstract_state(draft, optimizer, mesh))
                data.set_state(extra["data"])
            while ...:
                state, metrics = step_fn(state, target_state, next(data))
                ckpt.save(state, {"data": data.get_state()})          # no-op unless the step is due
            ckpt.save(state, {"data": data.get_state()}, force=True)  # the final step
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_every: int = 1000,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.quarantined = quarantine_incomplete_steps(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=int(save_every),
                                               enable_async_checkpointing=bool(async_save), create=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

    # ---- queries ------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(int(step))

    # ---- save / restore -----------------------------------------------------------------
    def save(self, state: TrainState, extra: Mapping[str, Any] | None = None, *, step: int | None = None,
             force: bool = False) -> bool:
        """Saves ``state`` and the JSON-able ``extra`` dict as checkpoint ``step`` (default ``state.step``)
        if the step is due (every ``save_every``) or ``force``. Returns whether a save started.

        Asynchronous when ``async_save``: returns once the arrays are in host memory."""
        step = int(jax.device_get(state.step)) if step is None else int(step)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     EXTRA_ITEM: ocp.args.JsonSave(dict(extra or {}))})
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, target, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores checkpoint ``step`` (default: the latest) into ``target``'s shapes, dtypes and shardings.

        Args:
          target: a TrainState-shaped tree of ``ShapeDtypeStruct`` with shardings (:func:`sharded_abstract_state`)
            or of placed arrays (their shardings are used; the arrays themselves are not modified).
          step: which checkpoint; None = the latest, falling back to older ones if reading it fails.
        Returns:
          (state, extra dict).
        """
        abstract = _as_restore_target(target)
        if step is not None:
            return self._restore(int(step), abstract)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for s in reversed(steps):
            try:
                return self._restore(s, abstract)
            except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: try the previous one
                log.warning("restoring checkpoint step %d from %s failed (%s: %s); trying an older one",
                            s, self.directory, type(e).__name__, e)
                errors.append(f"step {s}: {type(e).__name__}: {e}")
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))

    def _restore(self, step: int, abstract) -> tuple[TrainState, dict]:
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                     EXTRA_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], dict(restored[EXTRA_ITEM] or {})

    # ---- lifetime -----------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until every pending asynchronous save is written and finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["TrainCheckpointManager", "sharded_abstract_state", "is_complete_step_dir",
           "quarantine_incomplete_steps", "STATE_ITEM", "EXTRA_ITEM"]
