"""A read :class:`DraftCheckpoint` -> draft module: checked against the target, the tensors the file leaves to
the target filled in from it, every tensor read through the family's DeepSpec key table."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from flax import nnx

from dspark_jax.config import ConfigError, TargetConfig
from dspark_jax.convert.families import draft_family
from dspark_jax.convert.formats.common import DraftCheckpoint, Lazy
from dspark_jax.convert.keymap import fill_state, read_state, resolve_dtype
from dspark_jax.convert.names import DEEPSPEC_IGNORED
from dspark_jax.convert.safetensors_io import CheckpointError, checkpoint_files, iter_tensors
from dspark_jax.drafts.config import DraftConfig
from dspark_jax.drafts.temperatures import attach_saved_temperatures
from dspark_jax.nn.abstract import abstract_module
from dspark_jax.targets.registry import target_config_from_json


def check_fits(ck: DraftCheckpoint, target_config: TargetConfig) -> DraftConfig:
    """The checkpoint's config bound to ``target_config``, or a ConfigError naming the file's field."""
    cfg, t = ck.config, target_config
    where = os.path.join(ck.path, "config.json")
    vocab_field = "transformer_layer_config.vocab_size" if ck.format == "speculators" else "vocab_size"
    if cfg.arch.vocab_size != t.vocab_size:
        raise ConfigError(f"{where}: {vocab_field}={cfg.arch.vocab_size} but the target's vocab has {t.vocab_size} "
                          "ids: the draft was trained for another tokenizer")
    if cfg.arch.hidden_size != t.hidden_size:
        raise ConfigError(f"{where}: hidden_size={cfg.arch.hidden_size} but the target's is {t.hidden_size}")
    n = t.num_hidden_layers
    if cfg.target_layer_ids[-1] >= n - 1:
        raise ConfigError(
            f"{where}: {ck.layer_field}={list(ck.file_layer_ids)} ({ck.layer_convention} convention; layer outputs "
            f"{list(cfg.target_layer_ids)}) does not fit a {n}-layer target: the last tappable output is layer {n - 2}")
    if cfg.num_target_layers is not None and cfg.num_target_layers != n:
        raise ConfigError(f"{where}: num_target_layers={cfg.num_target_layers} but the target has {n} layers")
    if draft_family(cfg).kind.uses_mask_token and not 0 <= cfg.mask_token_id < t.vocab_size:
        raise ConfigError(f"{where}: mask_token_id={cfg.mask_token_id} is outside the target's vocab "
                          f"[0, {t.vocab_size})")
    return cfg.bind(t)


def target_source(target) -> tuple[TargetConfig, Callable[[str], np.ndarray]]:
    """A loaded target, or an HF target directory -> (its config, DeepSpec key -> the target's ``[V, H]`` copy of
    ``embed_tokens.weight`` / ``lm_head.weight``). A directory is not loaded: only those two tensors are read
    (a float32 copy of an 8B target would need 32 GB to fill in two matrices)."""
    if not isinstance(target, (str, os.PathLike)):
        def from_module(key):
            embed = np.asarray(target.embed_tokens.embedding[...])
            if key == "embed_tokens.weight" or target.lm_head is None:
                return embed
            return np.asarray(target.lm_head.kernel[...]).T
        return target.config, from_module
    path = os.fspath(target)
    tcfg = target_config_from_json(path)
    names = ("model.embed_tokens.weight", "lm_head.weight")
    handles = {k: h for _, k, h in iter_tensors(checkpoint_files(path)) if k in names}

    def from_files(key):
        want = "lm_head.weight" if key == "lm_head.weight" and not tcfg.tie_word_embeddings else names[0]
        if want not in handles:
            raise CheckpointError(f"target {path}: no {want!r} to take the draft's {key} from")
        return handles[want].read()
    return tcfg, from_files


def load_checkpoint(ck: DraftCheckpoint, dtype=None, *, target=None, sharding=None, attention_impl: str = "auto",
                    shared_placeholder: bool = False):
    """A :class:`DraftCheckpoint` -> draft module. Tensors the file leaves to the target come from ``target``
    (a loaded target, or an HF directory); ``shared_placeholder`` fills them with zeros instead (only for
    converting between formats that both leave them out)."""
    family = draft_family(ck.config)
    if family.load_dir is not None:     # a DeepSpec-only family (Gemma4): its own loader reads the directory
        return family.load_dir(ck.path, dtype, sharding=sharding, attention_impl=attention_impl)
    source = None if target is None else target_source(target)
    cfg = ck.config if source is None else check_fits(ck, source[0])
    tensors = dict(ck.tensors)
    if ck.shared:
        if source is not None:
            for k in ck.shared:
                tensors[k] = Lazy((cfg.arch.vocab_size, cfg.arch.hidden_size), lambda k=k: source[1](k),
                                  f"target:{k}")
        elif shared_placeholder:
            v, h = cfg.arch.vocab_size, cfg.arch.hidden_size
            for k in ck.shared:
                tensors[k] = Lazy((v, h), lambda: np.zeros((v, h), np.float32), f"placeholder:{k}")
        else:
            raise CheckpointError(
                f"{ck.path}: this {ck.label} checkpoint does not store {list(ck.shared)} (it shares the target's); "
                "pass the target (dj.load_draft(path, target=...) / --target DIR) to fill them in")
    dt = resolve_dtype(dtype if dtype is not None else cfg.dtype)
    cls = family.module
    abstract = abstract_module(lambda rngs: cls(cfg, dtype=dt, attention_impl=attention_impl, rngs=rngs))
    graphdef, abs_state = nnx.split(abstract)
    stream = ((t.source, k, t) for k, t in tensors.items())
    values = read_state(abs_state, [], family.rules, DEEPSPEC_IGNORED, dt, sharding, tensors=stream)
    draft = nnx.merge(graphdef, fill_state(abs_state, values))
    return attach_saved_temperatures(draft, ck.path)
