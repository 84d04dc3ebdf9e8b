"""dspark eval (spec §4.7 metrics, §4.8 datasets): metric aggregation by hand, dataset loading rules, the CLI
end to end on a tiny bigram target + near-oracle draft with a small BPE tokenizer, and its errors."""

import json
import os
import random

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import cli
from dspark_jax.config import TargetConfig
from dspark_jax.decode.metrics import RoundCounts, accepted_drafts_from_outcome, round_counts, summarize
from dspark_jax.eval import datasets as D
from dspark_jax.testing import build_chat_tokenizer, make_bigram, make_oracle_draft

# ../shared beside the checkout (as in CI and dev sessions); DSPARK_EVAL_DATA overrides
REAL_DATA = os.environ.get("DSPARK_EVAL_DATA",
                           os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "eval_datasets"))
V = 320           # tokenizer size == target vocab (the tokenizer is padded with filler tokens up to V)
BLOCK = 4

# ---------------------------------------------------------------------------------------------------------
# A small byte-level BPE with Qwen-style specials and chat template (built here, saved beside the target)
# ---------------------------------------------------------------------------------------------------------


CORPUS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins.",
    "How much in dollars does she make every day at the farmers' market? Please reason step by step, and put "
    "your final answer within \\boxed{}.", "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "What is the capital of France? The capital of France is Paris.", "Write a short poem about the sea.",
    "def add(a, b):\n    return a + b\n", "Two plus two equals four. Three times three equals nine.",
]


def build_tokenizer(size=V):
    return build_chat_tokenizer(CORPUS, size)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """(target dir with tokenizer, draft dir, target dir without tokenizer): a bigram target (next token depends
    on the current one only) and a near-oracle draft (Markov head = 0.7 x the bigram table): partial acceptance."""
    tok = build_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.5,
                       eos_token_id=im_end)
    target = make_bigram(dj.build_target(cfg, seed=0))
    root = tmp_path_factory.mktemp("eval_pair")
    bare = str(root / "target_no_tok")
    dj.save_target(target, bare)
    target.attach_tokenizer(tok)
    tdir = str(root / "target")
    dj.save_target(target, tdir)
    dcfg = dj.DraftConfig(block_size=BLOCK, mask_token_id=V - 1, target_layer_ids=(0, 1), num_anchors=4,
                          markov_rank=V, num_draft_layers=1, dtype="float32")
    draft = make_oracle_draft(target, dj.build_draft(target, dcfg, seed=1), scale=0.7)
    ddir = str(root / "draft")
    dj.save_draft(draft, ddir)
    return tdir, ddir, bare


# Prompts of 257..512 tokens once chat-templated with the tiny tokenizer, like the real gsm8k prompts of the
# test below: with 3 slots every engine of every test has the same compiled shape (3 slots, 512-token prompts).
GSM = ["What is two plus two? " * 16, "Three times three? " * 24,
       "Half of ten? " * 24 + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
       "Twelve minus five? " * 16]
MT = ["Write a poem about the sea. " * 16, "Capital of France? " * 24, "Name three colors. " * 20]
BATCH = "3"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    with open(d / "gsm8k.jsonl", "w") as f:
        for t in GSM:
            f.write(json.dumps({"turns": [t]}) + "\n")
    with open(d / "mt-bench.jsonl", "w") as f:
        for i, t in enumerate(MT):
            f.write(json.dumps({"turns": [t, "Now shorter."]}) + ("\n\n" if i == 0 else "\n"))
    (d / "alpaca.jsonl").write_text("")
    return str(d)


# ---------------------------------------------------------------------------------------------------------
# Metrics by hand
# ---------------------------------------------------------------------------------------------------------

# two rows, four round slots; row 1's 2nd round is terminal: a stop token among the drafts, 3 drafts accepted
# (the stop token is the 3rd), no bonus -> a = m = 3 and the effective proposal length is 3, not 4.
ACC = np.array([[5, 3, 1, 0], [2, 3, 0, 0]])
PROP = np.array([[4, 4, 4, 0], [4, 4, 0, 0]])
DRAFTS = np.array([[4, 2, 0, 0], [1, 3, 0, 0]])


def test_metrics_by_hand_with_terminal_round():
    c = round_counts(ACC, PROP, DRAFTS, max_positions=4)
    assert (c.rounds, c.accept_sum, c.proposal_sum, c.terminal_rounds, c.samples) == (5, 14, 19, 1, 2)
    assert c.proposals_at.tolist() == [5, 5, 5, 4]   # rounds with L > k (the terminal round's L is 3)
    assert c.accepted_at.tolist() == [4, 3, 2, 1]    # m = 4, 2, 0, 1, 3
    s = summarize(c)
    assert s["tau"] == pytest.approx(14 / 5)          # the terminal round contributes m = 3
    assert s["mean_proposal"] == pytest.approx(19 / 5) and s["propose"] == "3.80+1"
    assert s["verify_rate"] == pytest.approx(14 / 24)
    np.testing.assert_allclose(s["accept_rate"], [4 / 5, 3 / 5, 2 / 5, 1 / 4])
    np.testing.assert_allclose(s["conditional_accept_rate"], [4 / 5, 3 / 4, 2 / 3, (1 / 4) / (2 / 5)])


def test_metrics_without_drafts_treat_rounds_as_non_terminal():
    s = summarize(round_counts(ACC, PROP, max_positions=4))
    assert s["tau"] == pytest.approx(14 / 5) and s["terminal_rounds"] == 0
    assert s["mean_proposal"] == pytest.approx(20 / 5)
    np.testing.assert_allclose(s["accept_rate"], [4 / 5, 3 / 5, 1 / 5, 1 / 5])  # m = 4, 2, 0, 1, 2


def test_batches_merge_by_sums_not_means():
    a = round_counts(ACC[:1], PROP[:1], DRAFTS[:1], max_positions=4)
    b = round_counts(ACC[1:], PROP[1:], DRAFTS[1:], max_positions=4)
    merged = a + b
    whole = round_counts(ACC, PROP, DRAFTS, max_positions=4)
    assert merged.to_dict() == whole.to_dict()
    assert RoundCounts.from_dict(merged.to_dict()).to_dict() == whole.to_dict()
    assert summarize(merged)["tau"] == pytest.approx(2.8)
    assert (summarize(a)["tau"] + summarize(b)["tau"]) / 2 == pytest.approx(2.75)  # what averaging would give
    with pytest.raises(ValueError, match="positions"):
        a + RoundCounts(7)


def test_tau_is_one_plus_sum_of_accept_rates_without_stops():
    """Spec §8.3: with full blocks (theta = 0) and no stop rounds, tau = 1 + sum_k accept_rate@k."""
    rng = np.random.default_rng(0)
    m = rng.integers(0, BLOCK + 1, size=(6, 9))
    acc = np.where(rng.random((6, 9)) < 0.8, m + 1, 0)
    s = summarize(round_counts(acc, np.full_like(acc, BLOCK), max_positions=BLOCK))
    assert s["tau"] == pytest.approx(1 + sum(s["accept_rate"]))
    assert all(x >= y for x, y in zip(s["accept_rate"], s["accept_rate"][1:]))
    assert 0 < s["verify_rate"] <= 1


def test_metrics_edge_cases():
    s = summarize(round_counts(np.zeros((2, 3), int), np.zeros((2, 3), int), max_positions=4))
    assert s["rounds"] == 0 and s["tau"] == 0.0 and s["accept_rate"] == [None] * 4
    with pytest.raises(ValueError, match="shape"):
        round_counts(ACC, PROP[:, :2])
    with pytest.raises(ValueError, match="inconsistent"):
        round_counts(ACC, PROP, DRAFTS + 1)
    outcome = np.zeros((1, 2, 4), bool)
    outcome[0, 0, :3] = True
    assert accepted_drafts_from_outcome(outcome).tolist() == [[3, 0]]


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


def test_cap_shuffle_first_turn_and_math_suffix(data_dir):
    assert D.load_prompts(data_dir, "mt-bench") == MT   # first turns only
    full = D.load_prompts(data_dir, "gsm8k", max_samples=10)
    assert full[0] == GSM[0].rstrip("\n") + "\n" + D.MATH_SUFFIX
    assert full[2] == GSM[2]
    assert all(p.count(D.MATH_SUFFIX) == 1 for p in full)   # the file's 3rd prompt already had it
    capped = D.load_prompts(data_dir, "gsm8k", max_samples=2, seed=5)
    order = list(D.read_first_turns(os.path.join(data_dir, "gsm8k.jsonl")))
    random.Random(5).shuffle(order)
    assert capped == [D.with_math_suffix("gsm8k", t) for t in order[:2]]
    assert D.load_prompts(data_dir, "alpaca") == []
    assert D.with_math_suffix("mbpp", "x") == "x"


def test_dataset_errors(data_dir, tmp_path):
    with pytest.raises(D.DatasetError, match=r"unknown dataset\(s\) \['nope'\].*available: alpaca, gsm8k, mt-bench"):
        D.resolve_names(data_dir, "gsm8k,nope")
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.resolve_names(str(tmp_path / "missing"), "gsm8k")
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.load_prompts(data_dir, "humaneval")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"nope": 1}\n')
    with pytest.raises(D.DatasetError, match="bad.jsonl:2"):
        D.read_first_turns(bad)
    assert D.resolve_names(data_dir, None) == ["gsm8k", "mt-bench", "alpaca"]   # DeepSpec's order, present ones


@pytest.mark.skipif(not os.path.isdir(REAL_DATA), reason="shared eval datasets not present")
def test_real_files_keep_a_single_math_suffix():
    for name in ("gsm8k", "math500", "aime24", "aime25"):
        prompts = D.load_prompts(REAL_DATA, name, max_samples=40)
        assert prompts and all(p.count(D.MATH_SUFFIX) == 1 for p in prompts), name
    assert len(D.load_prompts(REAL_DATA, "aime25")) == 30 and len(D.load_prompts(REAL_DATA, "gsm8k")) == 500


def test_chat_prompt_has_no_system_prompt_and_no_thinking():
    tok = build_tokenizer()
    ids = D.chat_prompt_ids(tok, "Hello there")
    assert tok.decode(ids) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# ---------------------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------------------


def _recompute(npz_path, k):
    """tau, verify_rate and accept_rate@k straight from the saved round arrays (independent of metrics.py)."""
    z = np.load(npz_path)
    acc, prop, m = z["accept_lengths"], z["proposal_lengths"], z["accepted_drafts"]
    had = acc > 0
    terminal = had & (m == acc)
    eff = np.where(terminal, m, prop)
    n = had.sum()
    rates = [((m > j) & had).sum() / ((eff > j) & had).sum() for j in range(k)]
    return acc[had].sum() / n, acc[had].sum() / (eff[had].sum() + n), rates, z


def test_eval_cli_end_to_end(pair_dirs, data_dir, tmp_path, capsys):
    tdir, ddir, _ = pair_dirs
    tok = dj.load_target(tdir).tokenizer
    lengths = [len(D.chat_prompt_ids(tok, t)) for n in ("gsm8k", "mt-bench") for t in D.load_prompts(data_dir, n)]
    assert all(256 < n <= 512 for n in lengths), lengths   # one compiled shape (see GSM)
    out = tmp_path / "res"
    rc = cli.main(["eval", "--target", tdir, "--draft", ddir, "--data-dir", data_dir, "--datasets",
                   "gsm8k,mt-bench,alpaca", "--batch-size", BATCH, "--max-new-tokens", "12", "--temperature", "1.0",
                   "--seed", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["datasets"] == ["gsm8k", "mt-bench", "alpaca"]
    assert res["settings"]["temperature"] == 1.0 and res["settings"]["drafts_per_round"] == BLOCK
    rows = {r["dataset"]: r for r in res["datasets"]}
    assert set(rows) == {"gsm8k", "mt-bench"}                     # alpaca is empty: no row
    assert rows["gsm8k"]["samples"] == 4 and rows["mt-bench"]["samples"] == 3
    for name, r in rows.items():
        for key in ("tau", "mean_proposal", "propose", "verify_rate", "accept_rate", "conditional_accept_rate",
                    "speculative", "plain", "speedup", "compile_seconds", "counts", "rounds"):
            assert key in r, key
        assert len(r["accept_rate"]) == BLOCK and r["propose"].endswith("+1")
        assert r["speculative"]["tokens_per_s"] > 0 and r["plain"]["tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["speculative"]["tokens_per_s"] / r["plain"]["tokens_per_s"])
        tau, vr, rates, z = _recompute(out / "rounds" / f"{name}.npz", BLOCK)
        assert r["tau"] == pytest.approx(tau) and r["verify_rate"] == pytest.approx(vr)
        np.testing.assert_allclose(r["accept_rate"], rates)
        assert r["counts"]["rounds"] == r["rounds"] == int((z["accept_lengths"] > 0).sum())
        assert sorted(z["sample_index"].tolist()) == list(range(r["samples"]))
        assert r["speculative"]["new_tokens"] == int(z["new_tokens"].sum())
        assert 1.0 <= r["tau"] <= BLOCK + 1
    # the near-oracle draft gets partial acceptance; conditional rates are ratios of consecutive rates
    g = rows["gsm8k"]
    assert 0 < g["accept_rate"][0] < 1 and 1.5 < g["tau"] < BLOCK + 1
    assert g["conditional_accept_rate"][1] == pytest.approx(g["accept_rate"][1] / g["accept_rate"][0])
    md = (out / "results.md").read_text()
    assert "| dataset | n | #propose | tau |" in md and "| gsm8k | 4 |" in md and "conditional" in md
    assert "wrote" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_DATA, "gsm8k.jsonl")), reason="shared eval datasets absent")
def test_eval_cli_on_real_gsm8k_prompts(pair_dirs, tmp_path):
    tdir, ddir, _ = pair_dirs
    out = tmp_path / "res"
    assert cli.main(["eval", "--target", tdir, "--draft", ddir, "--data-dir", REAL_DATA, "--datasets", "gsm8k",
                     "--max-samples", "3", "--batch-size", BATCH, "--max-new-tokens", "12", "--out", str(out),
                     "--no-progress"]) == 0
    (row,) = json.loads((out / "results.json").read_text())["datasets"]
    assert row["dataset"] == "gsm8k" and row["samples"] == 3 and row["rounds"] >= 3
    tau, _, _, _ = _recompute(out / "rounds" / "gsm8k.npz", BLOCK)
    assert row["tau"] == pytest.approx(tau)


def test_eval_cli_errors(pair_dirs, data_dir, tmp_path):
    tdir, ddir, bare = pair_dirs
    base = ["eval", "--draft", ddir, "--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit, match=r"unknown dataset.*'nope'.*available: alpaca, gsm8k, mt-bench"):
        cli.main(base + ["--target", tdir, "--data-dir", data_dir, "--datasets", "nope"])
    with pytest.raises(SystemExit, match="eval data directory .* does not exist"):
        cli.main(base + ["--target", tdir, "--data-dir", str(tmp_path / "nowhere"), "--datasets", "gsm8k"])
    with pytest.raises(SystemExit, match="has no tokenizer"):
        cli.main(base + ["--target", bare, "--data-dir", data_dir, "--datasets", "gsm8k"])


def test_eval_cli_with_prefix_scheduler(pair_dirs, data_dir, tmp_path):
    """`dspark eval --sps`: the prefix scheduler picks the proposal lengths. A flat steps/s table (verification is
    free) keeps full proposals; a table whose step time grows with every verified token (SPS ~ 1/B) admits no
    draft at all (tau = 1: plain decoding inside the speculative loop), a round profile whose plain step beats any
    round switches speculation off (tau = 1), and all stay lossless at temperature 0."""
    tdir, ddir, _ = pair_dirs
    bmax = int(BATCH) * (BLOCK + 1)
    results = {}
    flat = [100.0] * (bmax + 1)
    # a round profile (`dspark profile --draft`) whose plain step is far faster than any round: switched off
    switched = {"format": "dspark-round-v1", "sps_table": flat, "plain_sps": 1e9, "verify_buckets": [],
                "batch": int(BATCH)}
    for name, table in (("flat", flat), ("linear", [100.0] + [100.0 / b for b in range(1, bmax + 1)]),
                        ("switched", switched)):
        sps = tmp_path / f"{name}.json"
        sps.write_text(json.dumps(table))
        out = tmp_path / name
        assert cli.main(["eval", "--target", tdir, "--draft", ddir, "--data-dir", data_dir, "--datasets", "gsm8k",
                         "--batch-size", BATCH, "--max-new-tokens", "8", "--temperature", "0", "--sps", str(sps),
                         "--out", str(out), "--no-progress"]) == 0
        results[name] = json.loads((out / "results.json").read_text())["datasets"][0]
    assert results["linear"]["mean_proposal"] == 0 and results["linear"]["tau"] == 1.0
    assert results["flat"]["mean_proposal"] > 0 and results["flat"]["tau"] > 1.0
    assert results["flat"]["greedy_match_rate"] == results["linear"]["greedy_match_rate"] == 1.0
    assert results["switched"]["tau"] == 1.0 and results["switched"]["greedy_match_rate"] == 1.0
    with pytest.raises(SystemExit, match="--sps"):
        cli.main(["eval", "--target", tdir, "--draft", ddir, "--data-dir", data_dir, "--datasets", "gsm8k",
                  "--sps", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x"), "--no-progress"])
    (tmp_path / "partial.json").write_text(json.dumps({"format": "dspark-round-v1", "sps_table": flat}))
    with pytest.raises(SystemExit, match=r"--sps .*without \['plain_sps', 'verify_buckets', 'batch'\]"):
        cli.main(["eval", "--target", tdir, "--draft", ddir, "--data-dir", data_dir, "--datasets", "gsm8k",
                  "--sps", str(tmp_path / "partial.json"), "--out", str(tmp_path / "x"), "--no-progress"])


@pytest.mark.multiprocess
def test_eval_on_two_processes_reports_what_one_reports(pair_dirs, data_dir, multiprocess, tmp_path):
    """2 real processes (loopback coordinator) share out each dataset's prompts; process 0 merges their parts
    into one report whose counts and round arrays are the 1-process run's (tokens/s are per process)."""
    tdir, ddir, _ = pair_dirs
    args = ["eval", "--target", tdir, "--draft", ddir, "--data-dir", data_dir, "--datasets", "gsm8k",
            "--batch-size", "2", "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "3", "--no-progress",
            "--no-warmup"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0  # 1 process: this one
    multiprocess.finish(multiprocess.start_group([*args, "--out", str(tmp_path / "two")], tmp_path))
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [r["dataset"] for r in two["datasets"]] == ["gsm8k"] and two["datasets"][0]["samples"] == 4
    for a, b in zip(one["datasets"], two["datasets"]):
        assert b["counts"] == a["counts"] and b["tau"] == a["tau"] and b["accept_rate"] == a["accept_rate"]
        for key in ("new_tokens",):
            assert b["speculative"][key] == a["speculative"][key] and b["plain"][key] == a["plain"][key]
        with np.load(tmp_path / "one" / "rounds" / f"{a['dataset']}.npz") as x, \
                np.load(tmp_path / "two" / "rounds" / f"{a['dataset']}.npz") as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                np.testing.assert_array_equal(y[k], x[k], err_msg=k)
    assert os.listdir(tmp_path / "two" / "rounds") == ["gsm8k.npz"]  # the parts are folded away
