"""dspark generate-data (spec §3.1 data regeneration): training-format output, multi-turn regeneration, error
records, stable ids, crash-safe resume, speculative == plain at temperature 0, unwritable output."""

import json

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import cli
from dspark_jax.config import TargetConfig
from dspark_jax.decode import synthetic as S
from dspark_jax.testing import build_chat_tokenizer

V = 320

CORPUS = ["Hello there! How are you today?", "What is the capital of France? The capital of France is Paris.",
          "Two plus two equals four. Three times three equals nine.", "Tell me more about the sea and the sky."]


def build_tokenizer(size=V):
    return build_chat_tokenizer(CORPUS, size)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(target dir with tokenizer, draft dir): a random target and a random DSpark draft (greedy speculative
    output equals plain greedy output whatever the draft)."""
    tok = build_tokenizer()
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.5,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    target = dj.build_target(cfg, seed=0)
    target.attach_tokenizer(tok)
    root = tmp_path_factory.mktemp("gen_pair")
    tdir, ddir = str(root / "target"), str(root / "draft")
    dj.save_target(target, tdir)
    dcfg = dj.DraftConfig(block_size=4, mask_token_id=V - 1, target_layer_ids=(0, 1), num_anchors=4, markov_rank=8,
                          num_draft_layers=1, dtype="float32")
    dj.save_draft(dj.build_draft(target, dcfg, seed=1), ddir)
    return tdir, ddir


A = {"id": "a", "source": "unit", "conversations": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "OLD ONE"}, {"role": "user", "content": "Tell me more."},
    {"role": "assistant", "content": "OLD TWO"}]}
B = {"conversations": [{"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": "OLD"}]}
C = {"turns": ["Two plus two?", "And three times three?"]}
BAD_ROLE = {"id": "d", "conversations": [{"role": "bot", "content": "x"}]}
ASSISTANT_FIRST = {"id": "e",
                   "conversations": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
LONG = {"id": "long", "conversations": [{"role": "user", "content": "sea " * 150}]}
F = {"id": "f", "conversations": [{"role": "user", "content": "How are you today?"}]}
ARGS = ["--batch-size", "2", "--max-new-tokens", "6", "--temperature", "0", "--max-prompt-tokens", "120",
        "--no-progress"]


def _write_input(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _static_turn_by_turn(target, records, stops, max_new=6):
    """Greedy regeneration as generate-data did before slot engines: turn t of every live conversation in one
    static batch. Returns {id: regenerated messages}."""
    convs = [S.Conversation(str(r.get("id", S.stable_id(r))), r, S.source_messages(r)) for r in records]
    live = convs
    while live := [c for c in live if c.next_user_turn()]:
        prompts = [S.render_chat(target.tokenizer, c.history) for c in live]
        out = dj.generate(target, prompts, max_new_tokens=max_new, temperature=0.0, stop_token_ids=stops)
        for c, ids in zip(live, out.token_lists()):
            ids = ids[:-1] if ids[-1] in stops else ids
            c.history.append({"role": "assistant", "content": target.tokenizer.decode(ids, skip_special_tokens=True)})
    return {c.id: c.history for c in convs}


@pytest.fixture(scope="module")
def full_run(model_dirs, tmp_path_factory):
    tdir, _ = model_dirs
    d = tmp_path_factory.mktemp("gen_full")
    inp = _write_input(d / "in.jsonl", [A, B, C, BAD_ROLE, ASSISTANT_FIRST, "{not json", A, LONG, F])
    out = str(d / "out" / "data.jsonl")   # the parent directory is created
    assert cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", out] + ARGS) == 0
    return inp, out


def test_output_format_multi_turn_and_errors(full_run, model_dirs, capsys):
    inp, out = full_run
    recs = _read(out)
    ids = [r["id"] for r in recs]
    assert ids == ["a", S.stable_id(B), S.stable_id(C), "d", "e", ids[5], "long", "f"]   # the duplicate 'a' once
    by_id = {r["id"]: r for r in recs}
    ok = [r for r in recs if r["status"] == "success"]
    assert [r["id"] for r in ok] == ["a", S.stable_id(B), S.stable_id(C), "f"]
    a = by_id["a"]
    assert a["source"] == "unit" and set(a) >= {"id", "conversations", "status"}
    assert [m["role"] for m in a["conversations"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in a["conversations"][:2]] == ["Be brief.", "Hello there!"]
    assert a["conversations"][3]["content"] == "Tell me more."
    assert "OLD" not in json.dumps([r["conversations"] for r in ok])   # every assistant turn regenerated
    assert len(a["generation"]["new_tokens"]) == 2 and all(1 <= n <= 6 for n in a["generation"]["new_tokens"])
    c = by_id[S.stable_id(C)]
    assert [m["role"] for m in c["conversations"]] == ["user", "assistant", "user", "assistant"] and "turns" not in c
    assert "invalid role 'bot'" in by_id["d"]["error"] and by_id["d"]["status"] == "error"
    assert "assistant" in by_id["e"]["error"]
    assert "invalid JSON" in recs[5]["error"] and recs[5]["status"] == "error"
    assert "over the limit of 120" in by_id["long"]["error"]

    # at T=0 every record equals the old path's: the conversations of a batch advancing turn by turn together,
    # each turn one static dj.generate batch
    target = dj.load_target(model_dirs[0])
    assert {r["id"]: r["conversations"] for r in ok} == _static_turn_by_turn(target, [A, B, C, F],
                                                                              S.resolve_stop_ids(target))

    # the training reader accepts the output and drops the error records
    from dspark_jax.train import data as TD

    samples, stats = TD.read_jsonl(out, target.tokenizer, "qwen", 4096, min_loss_tokens=1)
    assert stats.kept == 4 and stats.dropped_status == 4


def test_resume_after_crash_writes_each_id_once(full_run, model_dirs, tmp_path, capsys):
    inp, out = full_run
    tdir, _ = model_dirs
    with open(out, "rb") as f:
        lines = f.readlines()
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])   # died while writing record 4
    capsys.readouterr()
    assert cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", str(crashed)] + ARGS) == 0
    log = capsys.readouterr().out
    assert "partial last line" in log and "3 of 8 ids already" in log
    resumed = crashed.read_bytes()
    assert resumed.startswith(b"".join(lines[:3])) and resumed.endswith(b"\n")
    recs = _read(crashed)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == 8 and set(ids) == {r["id"] for r in _read(out)}
    assert {r["id"]: r["status"] for r in recs} == {r["id"]: r["status"] for r in _read(out)}
    assert resumed == b"".join(lines)   # folded in input order: the uninterrupted run's very bytes
    # a third run has nothing left to do
    assert cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", str(crashed)] + ARGS) == 0
    assert "8 of 8 ids already" in capsys.readouterr().out and crashed.read_bytes() == resumed

    # killed mid-run: records go to the process's shard as conversations finish (any order); the rerun takes in
    # its whole lines, drops the partial one and generates the rest: the same records
    from dspark_jax.decode.jsonl_shards import shard_path

    killed = tmp_path / "killed.jsonl"
    with open(shard_path(killed, 0, 1), "wb") as f:
        f.write(lines[6] + lines[1] + lines[4] + lines[2][:25])
    assert cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", str(killed)] + ARGS) == 0
    assert "resuming: 3 of 8 ids already" in capsys.readouterr().out
    assert sorted(killed.read_bytes().splitlines()) == sorted(b"".join(lines).splitlines())
    assert not list(tmp_path.glob("killed.jsonl.shard-*"))


def test_a_failing_generation_fails_only_its_conversation(full_run, model_dirs, tmp_path, monkeypatch):
    """An engine call that raises: the requests in flight are retried alone; the one that fails again becomes an
    error record, the others (and the conversations after it) are generated as in a run without the failure."""
    from dspark_jax.decode.slots import PlainSlotEngine

    inp, out = full_run
    bad = S.request_id("f", 0)
    insert = PlainSlotEngine._insert

    def failing(self, ids, lengths, slot_idx, req):
        if bad in np.asarray(req).tolist():
            raise RuntimeError("device fault")
        return insert(self, ids, lengths, slot_idx, req)

    monkeypatch.setattr(PlainSlotEngine, "_insert", failing)
    tdir, _ = model_dirs
    target = dj.load_target(tdir)
    settings = S.GenSettings(max_new_tokens=6, temperature=0.0, batch_size=2, max_prompt_tokens=120)
    path = tmp_path / "o.jsonl"
    report = S.generate_data(target, None, _write_input(tmp_path / "in.jsonl", [F, B, C]), path, settings,
                             target_dir=tdir, progress=False, log=lambda _: None)
    recs = {r["id"]: r for r in _read(path)}
    assert (report.success, report.errors) == (2, 1)
    assert recs["f"]["error"] == "turn 0: generation failed: RuntimeError: device fault"
    want = {r["id"]: r for r in _read(out)}
    for rid in (S.stable_id(B), S.stable_id(C)):
        assert recs[rid] == want[rid]


def test_speculative_equals_plain_at_temperature_zero(model_dirs, tmp_path, capsys):
    tdir, ddir = model_dirs
    inp = _write_input(tmp_path / "in.jsonl", [F, B])
    plain, spec = str(tmp_path / "plain.jsonl"), str(tmp_path / "spec.jsonl")
    assert cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", plain] + ARGS) == 0
    assert cli.main(["generate-data", "--target", tdir, "--draft", ddir, "--input", inp, "--output", spec] + ARGS) == 0
    assert "speculative generation" in capsys.readouterr().out
    assert [r["conversations"] for r in _read(spec)] == [r["conversations"] for r in _read(plain)]
    assert all(r["status"] == "success" for r in _read(spec))


def test_unwritable_output_and_missing_input(model_dirs, tmp_path):
    tdir, _ = model_dirs
    inp = _write_input(tmp_path / "in.jsonl", [F])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="not writable"):
        cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", str(blocker / "out.jsonl")])
    with pytest.raises(SystemExit, match="is a directory"):
        cli.main(["generate-data", "--target", tdir, "--input", inp, "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["generate-data", "--target", tdir, "--input", str(tmp_path / "nope.jsonl"),
                  "--output", str(tmp_path / "o.jsonl")])


def test_scan_output_repairs_only_a_partial_tail(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"id": "x", "status": "success"}\n\nnot a record\n{"id": "y", "status": "error"}\n{"id": "z", "st')
    scan = S.scan_output(p)
    assert scan.done_ids == {"x", "y"} and (scan.success, scan.errors, scan.bad_lines) == (1, 1, 1)
    assert scan.truncated_bytes == len(b'{"id": "z", "st')
    assert p.read_bytes().endswith(b'"error"}\n')
    assert S.scan_output(p).truncated_bytes == 0
    assert S.scan_output(tmp_path / "missing.jsonl").done_ids == set()


def test_stable_ids_and_record_validation():
    assert S.stable_id({"a": 1, "b": [1, 2]}) == S.stable_id({"b": [1, 2], "a": 1}) != S.stable_id({"a": 2})
    assert len(S.stable_id(B)) == 16
    assert [m["role"] for m in S.source_messages(C)] == ["user", "user"]
    for bad, msg in [([], "JSON object"), ({"conversations": []}, "missing conversations"),
                     ({"conversations": [{"role": "system", "content": "s"}]}, "no user message"),
                     ({"conversations": [{"role": "user", "content": 3}]}, "string content")]:
        with pytest.raises(ValueError, match=msg):
            S.source_messages(bad)


def test_render_chat_and_stop_ids(model_dirs):
    target = dj.load_target(model_dirs[0])
    tok = target.tokenizer
    ids = S.render_chat(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert S.resolve_stop_ids(target) == (tok.convert_tokens_to_ids("<|im_end|>"),)
    with pytest.raises(ValueError, match="no tokenizer"):
        S.render_chat(None, [])


def test_training_text_continues_the_generation_prompt():
    """The test/demo template renders a final assistant turn as Qwen3 does (an empty think block first), so the
    text a draft trains on is the generation prompt (enable_thinking=False) followed by the reply; earlier
    assistant turns carry no think block."""
    tok = build_tokenizer()
    one = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    two = one + [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "The sea."}]
    for conv in (one, two):
        prompt = tok.decode(S.render_chat(tok, conv[:-1]))
        full = tok.apply_chat_template(conv, tokenize=False)
        assert full == prompt + conv[-1]["content"] + "<|im_end|>\n"
    assert tok.apply_chat_template(two, tokenize=False).count("<think>") == 1


@pytest.mark.multiprocess
def test_two_processes_write_what_one_writes(full_run, model_dirs, multiprocess, tmp_path):
    """generate-data on 2 real processes that find each other as SLURM tasks do (JAX's detection from the job
    step's variables; loopback coordinator): batches dealt out by index, one shard per process, assembled by
    process 0 into the very file one process writes. It resumes a run that was cut short: a shard left behind
    (2 records and a partial third) is taken in first."""
    from dspark_jax.decode.jsonl_shards import shard_path

    inp, out = full_run
    tdir, _ = model_dirs
    two = tmp_path / "two.jsonl"
    with open(out, "rb") as f:
        lines = f.readlines()
    with open(shard_path(two, 1, 2), "wb") as f:
        f.write(b"".join(lines[:2]) + lines[2][:10])
    outs = multiprocess.finish(multiprocess.start_slurm_group(
        ["generate-data", "--target", tdir, "--input", inp, "--output", str(two)] + ARGS, tmp_path))
    assert "resuming: 2 of 8 ids already" in outs[0] and "cluster-detected" in outs[1]
    assert two.read_bytes() == b"".join(lines)
    assert not list(tmp_path.glob("two.jsonl.shard-*"))
    ok = sum(r["status"] == "success" for r in _read(out)[2:])
    assert f"8 conversations: {ok} success, {6 - ok} error, 2 already done" in outs[0]  # both processes' counts


def test_shards_are_folded_in_order_once(tmp_path):
    from dspark_jax.decode.jsonl_shards import fold_shards, shard_path

    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n')
    with open(shard_path(out, 0, 2), "w") as f:
        f.write('{"id": "c"}\n{"id": "a"}\n{"id": "x", "partial')   # a crash mid-write: the tail is dropped
    with open(shard_path(out, 1, 2), "w") as f:
        f.write('{"id": "b"}\n{"id": "d"}\n')
    assert fold_shards(out, order=["b", "c", "a"]) == 3
    assert [r["id"] for r in _read(out)] == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob("o.jsonl.shard-*"))
    assert fold_shards(out) == 0
