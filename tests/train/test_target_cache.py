"""Offline target cache (dspark_jax/train/target_cache.py), DeepSpec's version-2 layout (spec §3.2, §8.13).

Round trip across several shards; the byte layout checked with plain ``struct`` / file reads (not through our
reader); a cache produced by a tiny bf16 target equals that target's own unpadded forward bit for bit; and the
error paths (half-written cache, truncated index, missing shard, manifest for another target, bad shapes,
non-empty directory).
"""

import functools
import json
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dspark_jax.config import TargetConfig
from dspark_jax.targets import build_target
from dspark_jax.train.step import target_features
from dspark_jax.train.target_cache import CacheError, CacheManifest, TargetCache, TargetCacheWriter, write_target_cache

BF16 = ml_dtypes.bfloat16
LAYERS, H = (0, 2, 3), 8  # Lt = 3
FIELDS = ("input_ids", "attention_mask", "loss_mask", "target_hidden_states", "target_last_hidden_states")


def make_sample(rng, seq_len: int, dtype=BF16) -> dict:
    """Random sample whose float32 hidden values are exactly representable in ``dtype``."""
    def hidden(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype).astype(np.float32)

    return {"input_ids": rng.integers(0, 150_000, seq_len).astype(np.int64),
            "loss_mask": (rng.random(seq_len) < 0.6).astype(np.uint8),
            "target_hidden_states": hidden(seq_len, len(LAYERS) * H),
            "target_last_hidden_states": hidden(seq_len, H)}


def write(directory, samples, **kw) -> CacheManifest:
    kw = {"target_layer_ids": LAYERS, "hidden_size": H, **kw}
    with TargetCacheWriter(directory, **kw) as w:
        for s in samples:
            w.add(s["input_ids"], s["loss_mask"], s["target_hidden_states"], s["target_last_hidden_states"])
    return w.close()


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bit pattern, for bit-identity checks that don't depend on float comparison."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


# ---- round trip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dtype", ["bfloat16", "float32"])
def test_round_trip_several_shards(tmp_path, hidden_dtype):
    rng = np.random.default_rng(0)
    np_dtype = BF16 if hidden_dtype == "bfloat16" else np.float32
    lengths = [1, 7, 33, 16, 5, 2, 11]
    samples = [make_sample(rng, n, np_dtype) for n in lengths]
    # bf16: 70 bytes/token -> mostly one sample a shard, some pairs; the 33-token sample exceeds the limit alone
    limit = 1500 if hidden_dtype == "bfloat16" else 3000
    manifest = write(tmp_path / "c", samples, max_shard_bytes=limit, hidden_dtype=hidden_dtype,
                     target_model_name_or_path="tiny/qwen3")
    assert 1 < manifest.num_shards < len(samples)
    assert manifest.extra["total_tokens"] == sum(lengths)

    cache = TargetCache(tmp_path / "c")
    assert len(cache) == len(samples)
    np.testing.assert_array_equal(cache.lengths, lengths)
    assert cache.lengths.dtype == np.int64
    np.testing.assert_array_equal(cache.sample_ids, np.arange(len(samples)))
    for i, s in enumerate(samples):
        got = cache[i]
        assert set(got) == set(FIELDS)
        assert got["input_ids"].dtype == np.int32 and got["loss_mask"].dtype == np.uint8
        assert got["target_hidden_states"].dtype == np.dtype(np_dtype)
        assert got["target_hidden_states"].shape == (lengths[i], len(LAYERS) * H)
        assert got["target_last_hidden_states"].shape == (lengths[i], H)
        assert not got["target_hidden_states"].flags.writeable  # views of the read-only map
        np.testing.assert_array_equal(got["input_ids"], s["input_ids"])
        np.testing.assert_array_equal(got["loss_mask"], s["loss_mask"])
        np.testing.assert_array_equal(got["attention_mask"], np.ones(lengths[i], np.uint8))
        for k in ("target_hidden_states", "target_last_hidden_states"):
            np.testing.assert_array_equal(bits(got[k]), bits(s[k].astype(np_dtype)))
    # negative index, slices, and a pickled copy (data-loader workers) read the same bytes
    np.testing.assert_array_equal(cache[-1]["input_ids"], samples[-1]["input_ids"])
    assert [x["input_ids"].shape[0] for x in cache[1:4]] == lengths[1:4]
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(bits(clone[2]["target_hidden_states"]), bits(cache[2]["target_hidden_states"]))
    with pytest.raises(IndexError):
        cache[len(samples)]


def test_add_accepts_jax_arrays_masks_and_ids(tmp_path):
    rng = np.random.default_rng(1)
    s = make_sample(rng, 6)
    attention = np.array([1, 1, 1, 1, 0, 0], bool)
    with TargetCacheWriter(tmp_path / "c", target_layer_ids=LAYERS, hidden_size=H) as w:
        assert w.add(jnp.asarray(s["input_ids"], jnp.int32), s["loss_mask"].astype(bool),
                     jnp.asarray(s["target_hidden_states"], jnp.bfloat16),
                     jnp.asarray(s["target_last_hidden_states"]), attention_mask=attention, sample_id=41) == 0
    got = TargetCache(tmp_path / "c")[0]
    np.testing.assert_array_equal(got["attention_mask"], attention.astype(np.uint8))
    np.testing.assert_array_equal(bits(got["target_hidden_states"]), bits(s["target_hidden_states"].astype(BF16)))
    assert TargetCache(tmp_path / "c").sample_ids[0] == 41


# ---- byte layout, independent of the reader ---------------------------------------------------------------


def test_byte_layout_matches_spec(tmp_path):
    rng = np.random.default_rng(2)
    lengths = [3, 9, 1, 12, 4]
    samples = [make_sample(rng, n) for n in lengths]
    lt = len(LAYERS)
    write(tmp_path / "c", samples, max_shard_bytes=1200, target_model_name_or_path="Qwen/Qwen3-4B",
          data_paths=["a.jsonl", "b.jsonl"], chat_template="qwen", max_length=4096)
    d = tmp_path / "c"

    m = json.loads((d / "manifest.json").read_text())
    assert {k: m[k] for k in ("version", "num_samples", "target_layer_ids", "hidden_dtype", "token_dtype",
                              "mask_dtype", "index_record_size", "hidden_size", "target_model_name_or_path",
                              "data_paths", "chat_template", "max_length", "min_loss_tokens", "created_by",
                              "total_tokens")} == {
        "version": 2, "num_samples": 5, "target_layer_ids": [0, 2, 3], "hidden_dtype": "bfloat16",
        "token_dtype": "int32", "mask_dtype": "uint8", "index_record_size": 56, "hidden_size": H,
        "target_model_name_or_path": "Qwen/Qwen3-4B", "data_paths": ["a.jsonl", "b.jsonl"],
        "chat_template": "qwen", "max_length": 4096, "min_loss_tokens": 14, "created_by": "dspark_jax",
        "total_tokens": sum(lengths)}
    assert m["num_shards"] == len(m["shards"]) > 1
    assert m["shards"] == [{"shard_id": i, "file_name": f"shard-{i:05d}.bin"} for i in range(m["num_shards"])]
    assert sorted(os.listdir(d)) == sorted(["manifest.json", "samples.idx"] + [s["file_name"] for s in m["shards"]])

    assert struct.calcsize("<QIIQQQQQ") == 56
    raw_index = (d / "samples.idx").read_bytes()
    assert len(raw_index) == 56 * len(samples)
    shard_end: dict[int, int] = {}
    prev_shard = -1
    for i, s in enumerate(samples):
        sid, shard, seq, *offsets = struct.unpack("<QIIQQQQQ", raw_index[56 * i: 56 * (i + 1)])
        assert (sid, seq) == (i, lengths[i])
        assert shard in (prev_shard, prev_shard + 1)  # shards filled in order, never revisited
        prev_shard = shard
        sizes = [4 * seq, seq, seq, 2 * seq * lt * H, 2 * seq * H]
        assert offsets[0] == shard_end.get(shard, 0)  # samples back to back, a new shard starts at 0
        for k in range(4):
            assert offsets[k + 1] == offsets[k] + sizes[k]  # the five arrays contiguous, in spec order
        shard_end[shard] = offsets[4] + sizes[4]
        with open(d / f"shard-{shard:05d}.bin", "rb") as f:
            f.seek(offsets[0])
            blob = f.read(sum(sizes))
        parts = np.split(np.frombuffer(blob, np.uint8), np.cumsum(sizes)[:-1])
        np.testing.assert_array_equal(parts[0].view("<i4"), s["input_ids"])
        np.testing.assert_array_equal(parts[1], np.ones(seq, np.uint8))
        np.testing.assert_array_equal(parts[2], s["loss_mask"])
        # bf16 bits = top half of the float32 bits (exact: the values are bf16-representable); row-major
        for part, key in ((parts[3], "target_hidden_states"), (parts[4], "target_last_hidden_states")):
            want = (s[key].view("<u4") >> 16).astype("<u2").reshape(-1)
            np.testing.assert_array_equal(part.view("<u2"), want)
    for shard, end in shard_end.items():
        assert os.path.getsize(d / f"shard-{shard:05d}.bin") == end  # nothing after the last sample


def test_tap_layout_is_layer_major_per_token(tmp_path):
    """Per token, the Lt taps sit one after the other in target_layer_ids order (spec §8.13)."""
    s = 2
    hidden = np.zeros((s, len(LAYERS), H), np.float32)
    for t in range(s):
        for j in range(len(LAYERS)):
            hidden[t, j] = 100 * t + j  # token t, tap j
    write(tmp_path / "c", [{"input_ids": np.arange(s), "loss_mask": np.ones(s, np.uint8),
                            "target_hidden_states": hidden.reshape(s, -1),
                            "target_last_hidden_states": np.zeros((s, H), np.float32)}])
    got = TargetCache(tmp_path / "c")[0]["target_hidden_states"].astype(np.float32)
    np.testing.assert_array_equal(got.reshape(s, len(LAYERS), H)[..., 0], [[0, 1, 2], [100, 101, 102]])


# ---- produced by a target ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_target():
    cfg = TargetConfig(model_type="qwen3", vocab_size=32, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       initializer_range=0.2)
    return build_target(cfg, dtype="bfloat16", seed=0)


def corpus(rng):
    """(samples, kept indices): lengths vary across buckets; sample 5 has too few loss tokens."""
    samples = []
    for n in (5, 12, 9, 7, 30, 6, 17):
        mask = np.zeros(n, np.uint8)
        mask[n // 3:] = 1
        samples.append({"input_ids": rng.integers(0, 32, n).astype(np.int32), "loss_mask": mask})
    samples[5]["loss_mask"][:] = 0
    samples[5]["loss_mask"][-2:] = 1
    return samples, [0, 1, 2, 3, 4, 6]


def test_write_target_cache_equals_unpadded_forward(tmp_path):
    target = tiny_target()
    samples, kept = corpus(np.random.default_rng(3))
    # batches of 4 -> [5,12,9,7] padded to 16, [30,17] + 2 empty rows padded to 30 (buckets 8, 16, 30)
    manifest = write_target_cache(tmp_path / "c", samples, target, target_layer_ids=(0, 2, 3), batch_size=4,
                                  min_bucket=8, min_loss_tokens=3, progress=False, target_model_name_or_path="tiny")
    assert manifest.extra["dropped_short"] == 1 and manifest.num_samples == len(kept)
    assert manifest.min_loss_tokens == 3 and manifest.hidden_size == 16

    cache = TargetCache(tmp_path / "c")
    cache.check_compatible(target_layer_ids=[0, 2, 3], hidden_size=16, target_model_name_or_path="tiny")
    graphdef, state = nnx.split(target)
    # the same jitted call as the writer, but on the unpadded [1, S] sequence
    unpadded = jax.jit(lambda st, ids: target_features(nnx.merge(graphdef, st), ids, (0, 2, 3)))
    for row, i in enumerate(kept):
        ids = samples[i]["input_ids"]
        got = cache[row]
        np.testing.assert_array_equal(got["input_ids"], ids)
        np.testing.assert_array_equal(got["loss_mask"], samples[i]["loss_mask"])
        taps, last = jax.device_get(unpadded(state, jnp.asarray(ids)[None]))
        assert taps.dtype == got["target_hidden_states"].dtype == BF16
        # bit-identical: right padding changes nothing at the real positions (causal attention)
        np.testing.assert_array_equal(bits(got["target_hidden_states"]), bits(taps[0]))
        np.testing.assert_array_equal(bits(got["target_last_hidden_states"]), bits(last[0]))


def test_write_target_cache_equals_eager_forward_without_excess_precision(tmp_path):
    """Against the plain (op-by-op) ``target(ids[None], ...)`` call the default jitted cache differs by a few
    bf16 ulp, because XLA keeps fused bf16 elementwise chains in f32. With that turned off the cache equals the
    eager forward exactly -- so the difference is rounding placement, not padding."""
    target = tiny_target()
    samples, kept = corpus(np.random.default_rng(4))
    samples = [samples[i] for i in (0, 4)]  # lengths 5 and 30, one batch padded to 30
    write_target_cache(tmp_path / "c", samples, target, target_layer_ids=(0, 2, 3), batch_size=2,
                       min_bucket=8, min_loss_tokens=3, progress=False,
                       compiler_options={"xla_allow_excess_precision": False})
    cache = TargetCache(tmp_path / "c")
    for row, s in enumerate(samples):
        out = target(jnp.asarray(s["input_ids"])[None], tap_layer_ids=(0, 2, 3), return_logits=False)
        np.testing.assert_array_equal(bits(cache[row]["target_hidden_states"]), bits(np.asarray(out.taps[0])))
        np.testing.assert_array_equal(bits(cache[row]["target_last_hidden_states"]),
                                      bits(np.asarray(out.last_hidden[0])))


def test_write_target_cache_rejects_bad_samples(tmp_path):
    target = tiny_target()
    bad_vocab = [{"input_ids": np.array([1, 2, 40]), "loss_mask": np.ones(3, np.uint8)}]
    with pytest.raises(CacheError, match=r"sample 0: input_ids must be integers in \[0, 32\)"):
        write_target_cache(tmp_path / "a", bad_vocab, target, target_layer_ids=(0,), progress=False)
    ragged = [{"input_ids": np.array([1, 2, 3]), "loss_mask": np.ones(2, np.uint8)}]
    with pytest.raises(CacheError, match="sample 0: input_ids"):
        write_target_cache(tmp_path / "b", ragged, target, target_layer_ids=(0,), progress=False)
    assert not (tmp_path / "a").exists()  # validated before anything was written


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_cache(tmp_path):
    rng = np.random.default_rng(5)
    write(tmp_path / "c", [make_sample(rng, n) for n in (4, 6, 3)], max_shard_bytes=400,
          target_model_name_or_path="Qwen/Qwen3-4B")
    return tmp_path / "c"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        TargetCache(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CacheManifest.from_json(tmp_path / "nope" / "manifest.json")


def test_half_written_cache_is_rejected(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(RuntimeError, match="boom"):
        with TargetCacheWriter(tmp_path / "c", target_layer_ids=LAYERS, hidden_size=H) as w:
            s = make_sample(rng, 5)
            w.add(s["input_ids"], s["loss_mask"], s["target_hidden_states"], s["target_last_hidden_states"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "c") == ["shard-00000.bin"]  # no index, no manifest
    with pytest.raises(CacheError, match="no manifest.json.*unfinished"):
        TargetCache(tmp_path / "c")
    with pytest.raises(CacheError, match="aborted"):
        w.close()


def test_truncated_index(small_cache):
    idx = small_cache / "samples.idx"
    idx.write_bytes(idx.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"samples.idx is 158 bytes .*num_samples=3 needs 3 \* 56 = 168"):
        TargetCache(small_cache)


def test_missing_shard(small_cache):
    os.remove(small_cache / "shard-00001.bin")
    with pytest.raises(CacheError, match=r"shard 1 missing: .*shard-00001.bin \(1 samples point to it\)"):
        TargetCache(small_cache)


def test_record_outside_shard(small_cache):
    idx = small_cache / "samples.idx"
    raw = bytearray(idx.read_bytes())
    rec = list(struct.unpack_from("<QIIQQQQQ", raw, 56))
    rec[7] += 1  # sample 1's last hidden now ends one byte past its shard
    struct.pack_into("<QIIQQQQQ", raw, 56, *rec)
    idx.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"record 1 \(sample_id 1, seq_len 6, shard-00001.bin\) has "
                                         r"target_last_hidden_states bytes outside its shard"):
        TargetCache(small_cache)


@pytest.mark.parametrize("field,value,message", [
    ("version", 1, "'version' must be 2"),
    ("index_record_size", 48, "'index_record_size' must be 56"),
    ("hidden_dtype", "float16", "'hidden_dtype' must be one of"),
    ("token_dtype", "int64", "'token_dtype' must be 'int32'"),
    ("target_layer_ids", [3, 1], "'target_layer_ids' must be in ascending order"),
    ("shards", [{"shard_id": 0, "file_name": "../x.bin"}], "'shards'"),
    ("hidden_size", None, r"missing required field\(s\) \['hidden_size'\]"),
])
def test_bad_manifest(small_cache, field, value, message):
    path = small_cache / "manifest.json"
    m = json.loads(path.read_text())
    if value is None:
        del m[field]
    else:
        m[field] = value
    path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match=message) as e:
        TargetCache(small_cache)
    assert str(path) in str(e.value)


def test_unknown_manifest_fields_are_ignored_and_kept(small_cache):
    path = small_cache / "manifest.json"
    m = json.loads(path.read_text())
    m["some_future_field"] = {"x": 1}
    path.write_text(json.dumps(m))
    cache = TargetCache(small_cache)
    assert cache.manifest.extra["some_future_field"] == {"x": 1}
    assert cache.manifest.to_json()["some_future_field"] == {"x": 1}


def test_check_compatible(small_cache):
    cache = TargetCache(small_cache)
    cache.check_compatible(target_layer_ids=[0, 2, 3], hidden_size=H, target_model_name_or_path="Qwen/Qwen3-4B")
    cache.check_compatible(target_layer_ids=[0, 2, 3], hidden_size=H)  # no name in the config: not compared
    with pytest.raises(CacheError, match=r"target_layer_ids: cache \[0, 2, 3\] vs config \[1, 2, 3\].*Rebuild"):
        cache.check_compatible(target_layer_ids=[1, 2, 3], hidden_size=H)
    with pytest.raises(CacheError, match=r"hidden_size: cache 8 vs config 16"):
        cache.check_compatible(target_layer_ids=[0, 2, 3], hidden_size=16)
    with pytest.raises(CacheError, match=r"target_model_name_or_path: cache 'Qwen/Qwen3-4B' vs config 'Qwen/Qwen3-8B'"):
        cache.check_compatible(target_layer_ids=[0, 2, 3], hidden_size=H, target_model_name_or_path="Qwen/Qwen3-8B")


@pytest.mark.parametrize("field,change,message", [
    ("input_ids", lambda a: a[None], r"input_ids: expected a non-empty 1-D array \[S\], got shape \(1, 5\)"),
    ("loss_mask", lambda a: a[:4], r"loss_mask: expected shape \(5,\) like input_ids, got \(4,\)"),
    ("loss_mask", lambda a: a * 2 + 1, "loss_mask: values must be 0 or 1"),
    ("target_hidden_states", lambda a: a[:, :H],
     r"target_hidden_states: expected shape \(5, 24\) \(\[S, Lt\*H\] with Lt=3, H=8\), got \(5, 8\)"),
    ("target_last_hidden_states", lambda a: a.T, r"target_last_hidden_states: expected shape \(5, 8\)"),
    ("target_last_hidden_states", lambda a: a.astype(np.int32), "expected a floating-point array"),
])
def test_add_rejects_bad_arrays(tmp_path, field, change, message):
    s = make_sample(np.random.default_rng(7), 5)
    s[field] = change(s[field])
    w = TargetCacheWriter(tmp_path / "c", target_layer_ids=LAYERS, hidden_size=H)
    with pytest.raises(CacheError, match=message):
        w.add(s["input_ids"], s["loss_mask"], s["target_hidden_states"], s["target_last_hidden_states"])
    assert w.num_samples == 0
    w.abort()


def test_non_empty_directory_needs_overwrite(small_cache):
    (small_cache / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not empty.*overwrite=True"):
        TargetCacheWriter(small_cache, target_layer_ids=LAYERS, hidden_size=H)
    assert len(TargetCache(small_cache)) == 3  # untouched
    write(small_cache, [make_sample(np.random.default_rng(8), 2)], overwrite=True)
    assert sorted(os.listdir(small_cache)) == ["manifest.json", "notes.txt", "samples.idx", "shard-00000.bin"]
    assert len(TargetCache(small_cache)) == 1


def test_writer_rejects_bad_layout_arguments(tmp_path):
    with pytest.raises(CacheError, match="target_layer_ids"):
        TargetCacheWriter(tmp_path / "a", target_layer_ids=[], hidden_size=H)
    with pytest.raises(CacheError, match="hidden_dtype"):
        TargetCacheWriter(tmp_path / "b", target_layer_ids=LAYERS, hidden_size=H, hidden_dtype="float16")
    with pytest.raises(CacheError, match=r"extra_manifest may not set.*'version'"):
        TargetCacheWriter(tmp_path / "c", target_layer_ids=LAYERS, hidden_size=H, extra_manifest={"version": 3})
