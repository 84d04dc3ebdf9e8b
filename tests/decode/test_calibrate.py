"""Confidence calibration (spec §4.7, §6.4): ECE / AUC by hand, STS recovering a known miscalibration, the
temperatures on disk / on the draft / applied by the decode loop, and `dspark calibrate` end to end."""

import argparse
import itertools
import json
import os

import numpy as np
import pytest
from test_speculative import PROMPTS

import dspark_jax as dj
from dspark_jax.config import TargetConfig
from dspark_jax.decode import calibrate as C
from dspark_jax.decode.scheduler import PrefixScheduler
from dspark_jax.eval.calibrate import add_calibrate_parser
from dspark_jax.testing import build_chat_tokenizer, make_bigram, make_oracle_draft

# ---------------------------------------------------------------------------------------------------------
# Metrics by hand
# ---------------------------------------------------------------------------------------------------------

def test_ece_by_hand():
    # bins of width 0.05: {0.1, 0.12} -> bin 2, {0.9} -> bin 18, {0.97, 0.99} -> bin 19
    pred = np.array([0.1, 0.12, 0.9, 0.97, 0.99])
    label = np.array([0, 1, 1, 1, 1])
    want = (2 * abs(0.11 - 0.5) + abs(0.9 - 1) + 2 * abs(0.98 - 1)) / 5
    assert C.ece(pred, label) == pytest.approx(want)
    assert C.ece([1.0, 1.0], [1, 1]) == 0.0             # p = 1 falls in the last bin, not past it


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 60) / 5.0                 # many ties
    label = rng.random(60) < 0.4
    pos, neg = score[label], score[~label]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert C.auc(score, label) == pytest.approx(np.mean(pairs))
    assert C.auc([0.1, 0.2], [1, 1]) is None
    assert C.auc([0.1, 0.9], [0, 1]) == 1.0


# ---------------------------------------------------------------------------------------------------------
# STS on synthetic confidences with a known miscalibration
# ---------------------------------------------------------------------------------------------------------

TRUE_T = (2.0, 0.5, 3.0, 2.0)   # reported logit = true logit * T: > 1 overconfident, < 1 underconfident


def _synthetic(n, seed, vary_lengths=False):
    """Conditional acceptance of position k ~ Bernoulli(sigmoid(z*_k)); the draft reports z*_k * T_k.
    Full blocks by default (as `dspark calibrate` records); ``vary_lengths``: L uniform in 1..4."""
    rng = np.random.default_rng(seed)
    z_true = rng.normal([2.0, 1.8, 1.6, 1.5], 1.5, (n, 4))           # acceptance ~0.8 per position
    accepted = rng.random((n, 4)) < 1 / (1 + np.exp(-z_true))
    labels = np.cumprod(accepted, axis=1).astype(bool)               # prefix survival (m > k)
    lengths = rng.integers(1, 5, n) if vary_lengths else np.full(n, 4)
    valid = np.arange(4)[None, :] < lengths[:, None]                  # position k labelled iff k < L
    return z_true * np.asarray(TRUE_T), labels, valid


def test_sts_recovers_known_temperatures_and_cuts_ece():
    z, labels, valid = _synthetic(40000, seed=1)
    temps = C.fit_sts(z, labels, valid)
    # later positions move the cumulative product less, so ECE pins their T less tightly (worst seen over 8
    # seeds: 2% / 5% / 5% / 10.5%)
    np.testing.assert_allclose(temps, TRUE_T, rtol=0.15)
    z_ev, l_ev, v_ev = _synthetic(40000, seed=2)                      # judged on fresh data (ratio >= 4.5 seen)
    report = C.calibration_report(z_ev, l_ev, v_ev, temps)
    assert [e["position"] for e in report] == [1, 2, 3, 4]
    for e in report:
        assert e["ece_before"] > 0.02, e                              # a real miscalibration to remove
        assert e["ece_after"] <= e["ece_before"] / 3, e
        # dividing a logit by T > 0 keeps every position's ranking: the conditional AUC is the raw logits' AUC,
        # and the cumulative product's AUC moves only by the re-weighting between positions
        assert e["auc_after"] >= e["auc_before"] - 0.005 and abs(e["auc_after"] - e["auc_before"]) < 0.03, e
    assert report[0]["auc_after"] == pytest.approx(report[0]["auc_before"], abs=1e-12)   # one factor: same order
    # order preservation, exactly: per position the calibrated confidences rank rounds like the raw logits
    cal = C._sigmoid(z_ev / np.asarray(temps))
    for k in range(4):
        rows = v_ev[:, k]
        assert C.auc(cal[rows, k], l_ev[rows, k]) == pytest.approx(C.auc(z_ev[rows, k], l_ev[rows, k]), abs=1e-12)


def test_sts_is_identity_on_calibrated_confidences_and_handles_empty_positions():
    z, labels, valid = _synthetic(40000, seed=3)
    z = z / np.asarray(TRUE_T)                                       # now calibrated
    temps = C.fit_sts(z, labels, valid)
    np.testing.assert_allclose(temps, 1.0, rtol=0.15)
    valid[:, 3] = False
    assert C.fit_sts(z, labels, valid)[3] == 1.0
    # ragged proposal lengths (position k labelled only when k < L) still recover the temperatures
    z, labels, valid = _synthetic(40000, seed=6, vary_lengths=True)
    np.testing.assert_allclose(C.fit_sts(z, labels, valid)[:3], TRUE_T[:3], rtol=0.15)


def test_sts_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        C.fit_sts(np.zeros((3, 2)), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="NaN or inf"):
        C.fit_sts(np.array([[np.nan, 0.0]]), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="positive"):
        C.fit_sts(np.zeros((2, 2)), np.ones((2, 2), bool), grid=[1.0, -2.0])


def test_reliability_diagram_png(tmp_path):
    pytest.importorskip("matplotlib")
    z, labels, valid = _synthetic(2000, seed=4)
    path = C.reliability_diagram(z, labels, valid, TRUE_T, str(tmp_path / "rel.png"), log=lambda m: None)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_without_matplotlib_is_skipped(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    msgs = []
    z, labels, valid = _synthetic(100, seed=5)
    assert C.reliability_diagram(z, labels, valid, TRUE_T, str(tmp_path / "r.png"), log=msgs.append) is None
    assert "matplotlib is not installed" in msgs[0] and not (tmp_path / "r.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Temperatures on disk, on the draft, in the decode loop
# ---------------------------------------------------------------------------------------------------------

def test_temperatures_round_trip_and_errors(tmp_path):
    path = C.save_temperatures(str(tmp_path), [1.5, 0.5, 2.0, 1.0], {"fit_rounds": 3})
    assert os.path.basename(path) == C.TEMPERATURES_FILE
    assert C.load_temperatures(str(tmp_path)) == (1.5, 0.5, 2.0, 1.0)
    assert json.loads(open(path).read())["fit_rounds"] == 3
    with pytest.raises(ValueError, match="> 0"):
        C.save_temperatures(str(tmp_path / "t.json"), [1.0, 0.0])
    with pytest.raises(FileNotFoundError, match="dspark calibrate"):
        C.load_temperatures(str(tmp_path / "none"))
    (tmp_path / "bad.json").write_text('{"temperatures": [1, "x"]}')
    with pytest.raises(ValueError):
        C.load_temperatures(str(tmp_path / "bad.json"))


def test_loop_applies_temperatures_from_the_draft_dir(plain_target, draft_factory, tmp_path):
    """save_draft/load_draft carry sts_temperatures.json; the loop then uses sigmoid(z / T) everywhere (the
    recorded confidences prove it); calibration=False gives the raw ones; greedy output is unchanged."""
    temps = (2.0, 0.5, 1.5, 3.0)
    draft = C.attach_temperatures(draft_factory(plain_target, rank=4), temps)
    dj.save_draft(draft, str(tmp_path / "d"))
    assert C.load_temperatures(str(tmp_path / "d")) == temps
    loaded = dj.load_draft(str(tmp_path / "d"))
    assert loaded.sts_temperatures == temps
    ref = dj.generate(plain_target, PROMPTS, max_new_tokens=24, stop_token_ids=())
    sched = PrefixScheduler(tuple(1000.0 / (1 + b / 8.0) for b in range(21)))
    cal = dj.speculative_generate(plain_target, loaded, PROMPTS, max_new_tokens=24, stop_token_ids=(),
                                  scheduler=sched)
    raw = dj.speculative_generate(plain_target, loaded, PROMPTS, max_new_tokens=24, stop_token_ids=(),
                                  scheduler=sched, calibration=False)
    np.testing.assert_array_equal(cal.tokens, ref.tokens)
    np.testing.assert_array_equal(raw.tokens, ref.tokens)
    for out, t in ((cal, np.asarray(temps)), (raw, np.ones(4))):
        had = out.accept_lengths > 0
        z = out.stats["_round_confidence_logits"][had]
        np.testing.assert_allclose(out.stats["_round_confidence"][had], 1 / (1 + np.exp(-z / t)), rtol=1e-5,
                                   atol=1e-6)
    # explicit temperatures and a path work too; a wrong count is refused
    path_out = dj.speculative_generate(plain_target, draft_factory(plain_target, rank=4), PROMPTS, max_new_tokens=24,
                                       stop_token_ids=(), scheduler=sched, calibration=str(tmp_path / "d"))
    np.testing.assert_array_equal(path_out.proposal_lengths, cal.proposal_lengths)
    with pytest.raises(ValueError, match="3 temperatures"):
        dj.speculative_generate(plain_target, loaded, PROMPTS, max_new_tokens=4, calibration=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="> 0"):
        dj.speculative_generate(plain_target, loaded, PROMPTS, max_new_tokens=4, calibration=[1.0, 2.0, 3.0, -1])
    with pytest.raises(ValueError, match="no confidence head"):
        dj.speculative_generate(plain_target, draft_factory(plain_target, kind=None, confidence=False), PROMPTS,
                                max_new_tokens=4, calibration=temps)


# ---------------------------------------------------------------------------------------------------------
# `dspark calibrate` end to end (small bigram pair with a chat tokenizer)
# ---------------------------------------------------------------------------------------------------------

V = 320
CORPUS = ["What is two plus two? Two plus two is four.", "Write a poem about the sea and the sky.",
          "def add(a, b):\n    return a + b\n", "The capital of France is Paris. Name three colors."]


@pytest.fixture(scope="module")
def calib_dirs(tmp_path_factory):
    tok = build_chat_tokenizer(CORPUS, V)
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, initializer_range=0.5,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    target = make_bigram(dj.build_target(cfg, seed=0))
    target.attach_tokenizer(tok)
    root = tmp_path_factory.mktemp("calib")
    tdir, ddir, data = str(root / "target"), str(root / "draft"), root / "data"
    dj.save_target(target, tdir)
    dcfg = dj.DraftConfig(block_size=4, mask_token_id=V - 1, target_layer_ids=(0, 1), num_anchors=4,
                          markov_rank=V, num_draft_layers=1, dtype="float32")
    dj.save_draft(make_oracle_draft(target, dj.build_draft(target, dcfg, seed=1), scale=0.7), ddir)
    data.mkdir()
    with open(data / "mt-bench.jsonl", "w") as f:
        for t in ["Write a poem about the sea.", "Name three colors.", "What is two plus two?", "Capital of France?",
                  "Write a function that adds.", "Describe the sky."]:
            f.write(json.dumps({"turns": [t]}) + "\n")
    return tdir, ddir, str(data)


def test_calibrate_cli_end_to_end(calib_dirs, tmp_path, capsys):
    tdir, ddir, data = calib_dirs
    parser = argparse.ArgumentParser()
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    report_dir = tmp_path / "rep"
    args = parser.parse_args(["calibrate", "--target", tdir, "--draft", ddir, "--data", data, "--datasets",
                              "mt-bench", "--max-new-tokens", "16", "--batch-size", "3", "--seed", "0",
                              "--report-dir", str(report_dir), "--no-progress"])
    assert args.func(args) == 0
    temps = C.load_temperatures(ddir)
    assert len(temps) == 4 and all(t > 0 for t in temps)
    assert dj.load_draft(ddir).sts_temperatures == temps                     # applied from now on
    summary = json.loads((report_dir / "calibration.json").read_text())
    assert summary["prompts"] == 6 and summary["temperatures"] == list(temps)
    assert summary["fit_rounds"] > 0 and summary["eval_rounds"] > 0
    assert [e["position"] for e in summary["positions"]] == [1, 2, 3, 4]
    rounds = dict(np.load(report_dir / "rounds.npz"))
    z, labels, valid = C.rounds_to_samples(rounds)
    assert z.shape[1] == 4 and valid[:, 0].all()                              # full blocks: all positions
    assert 0 < labels[:, 0].mean() < 1                                        # near-oracle: partial acceptance
    assert "| position | n | T |" in capsys.readouterr().out
    os.remove(os.path.join(ddir, C.TEMPERATURES_FILE))                        # leave the fixture uncalibrated
