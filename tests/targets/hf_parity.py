"""What the transformers-parity tests of the DeepSeek-V3 and Gemma4 families share: checkpoint pairs saved from
random transformers models, the jitted forward and cache extension, and the checks both families' pairs pass.

Needs torch (the test extra), as the tests that import it do: without it their modules are skipped.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dspark_jax as dj

torch = pytest.importorskip("torch", reason="torch (test extra) runs the transformers reference")


def hf_pairs(tmp_path_factory, hf_class, hf_config, kinds, seed, move_1d, buffer_suffix, move_buffer):
    """kind -> (checkpoint dir, transformers model, our target loaded from that dir).

    Per kind (the i-th): ``hf_class(hf_config(kind))`` with torch seed ``seed + i``, eager attention; then every 1-D
    parameter goes through ``move_1d`` and every buffer named ``*buffer_suffix`` through ``move_buffer`` (in place,
    so a weight left at its init cannot hide a mix-up); saved with ``save_pretrained`` and loaded with
    ``dj.load_target``."""
    out = {}
    for i, kind in enumerate(kinds):
        torch.manual_seed(seed + i)
        hf = hf_class(hf_config(kind)).eval()
        hf.config._attn_implementation = "eager"
        with torch.no_grad():
            for _, p in hf.named_parameters():
                if p.ndim == 1:
                    move_1d(p)
            for name, b in hf.named_buffers():
                if name.endswith(buffer_suffix):
                    move_buffer(b)
        path = tmp_path_factory.mktemp(f"{hf_class.__name__}_{kind}")
        hf.save_pretrained(path)
        out[kind] = (str(path), hf, dj.load_target(path))
    return out


@functools.partial(nnx.jit, static_argnames=("taps",))
def forward(target, ids, taps=()):
    """-> (logits, taps, last_hidden) of a cache-free forward."""
    out = target(ids, tap_layer_ids=taps)
    return out.logits, out.taps, out.last_hidden


@nnx.jit
def extend(target, ids, cache, num_new):
    """-> (logits, layer 1's taps, cache) of ``num_new`` [B] tokens of ``ids`` appended to ``cache``."""
    out = target(ids, cache, num_new=num_new, tap_layer_ids=(1,))
    return out.logits, out.taps, out.cache


def hf_forward(hf, ids):
    """transformers' forward of ``ids`` [B, S] with every hidden state."""
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids)), output_hidden_states=True)


def assert_logits_and_taps_match(hf, target, ids, tol):
    """Logits, the taps of the embeddings (-1) and of every layer but the last, and the last hidden state of
    ``target`` on ``ids`` equal transformers' -> our logits."""
    n = target.config.num_hidden_layers
    ref = hf_forward(hf, ids)
    taps = (-1,) + tuple(range(n - 1))
    logits, tapped, last_hidden = forward(target, jnp.asarray(ids), taps=taps)
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=tol, rtol=0)
    h = target.config.hidden_size
    for j, layer_id in enumerate(taps):
        np.testing.assert_allclose(np.asarray(tapped[..., j * h:(j + 1) * h]),
                                   ref.hidden_states[layer_id + 1].numpy(), atol=tol, rtol=0, err_msg=f"tap {layer_id}")
    # transformers' last hidden_states entry is the post-norm output
    np.testing.assert_allclose(np.asarray(last_hidden), ref.hidden_states[-1].numpy(), atol=tol, rtol=0)
    return logits


def assert_decode_matches(target, ids, tol):
    """``ids`` [2, 14] fed one token at a time through a 16-slot cache give the logits and layer-1 taps of one
    full forward."""
    full_logits, full_taps, _ = forward(target, ids, taps=(1,))
    one = jnp.ones((2,), jnp.int32)
    cache = target.init_cache(2, 16)
    logits, taps = [], []
    for i in range(14):
        lg, tp, cache = extend(target, ids[:, i:i + 1], cache, one)
        logits.append(lg)
        taps.append(tp)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 14])
    np.testing.assert_allclose(np.concatenate(logits, 1), np.asarray(full_logits), atol=tol, rtol=0)
    np.testing.assert_allclose(np.concatenate(taps, 1), np.asarray(full_taps), atol=tol, rtol=0)


def assert_round_trip(target, hf, hf_class, out_dir, ids):
    """``dj.save_target`` to ``out_dir`` then ``dj.load_target``: the same parameter paths, bit-identical values and
    an equal config; and transformers reads what we wrote to the logits (on ``ids``) of the model we started from."""
    dj.save_target(target, out_dir)
    again = dj.load_target(out_dir)
    a, b = nnx.to_flat_state(nnx.state(target, nnx.Param)), nnx.to_flat_state(nnx.state(again, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(p))
    assert again.config == target.config
    hf2 = hf_class.from_pretrained(out_dir, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_forward(hf2, ids).logits.numpy(), hf_forward(hf, ids).logits.numpy(),
                               atol=1e-5, rtol=0)
