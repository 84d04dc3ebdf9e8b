"""The ``dspark`` command line on bad input: one ``error: ...`` line on stderr and exit status 2, no traceback;
``--debug`` (before or after the subcommand) or DSPARK_DEBUG=1 raises the original exception instead. A missing
optional module names the extra that installs it."""

import pytest

import dspark_jax as dj
from dspark_jax import cli
from dspark_jax.config import TargetConfig

V = 64


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    cfg = TargetConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, eos_token_id=1)
    path = str(tmp_path_factory.mktemp("cli_target") / "target")
    dj.save_target(dj.build_target(cfg, seed=0), path)
    return path


def _generate(target_dir, *extra):
    return ["generate", "--target", target_dir, "--prompt-ids", "1,2,999999", "--max-new-tokens", "2", *extra]


def test_out_of_vocab_prompt_is_one_error_line(target_dir, capsys):
    assert cli.main(_generate(target_dir)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "999999" in lines[0] and "vocab" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["after", "before", "env"])
def test_debug_shows_the_original_exception(target_dir, where, monkeypatch):
    if where == "after":
        argv = _generate(target_dir, "--debug")
    elif where == "before":
        argv = ["--debug", *_generate(target_dir)]
    else:
        monkeypatch.setenv("DSPARK_DEBUG", "1")
        argv = _generate(target_dir)
    with pytest.raises(ValueError, match="999999"):
        cli.main(argv)


def test_missing_checkpoint_and_bad_config_are_one_line(tmp_path, capsys):
    assert cli.main(["generate", "--target", str(tmp_path / "nowhere"), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:   # commands that check their input themselves exit with the line
        cli.main(["train", "--config", "tiny", "optim.no_such_key=1"])
    assert str(e.value.code).startswith("error: ") and "no_such_key" in str(e.value.code)


def test_missing_optional_module_names_its_extra():
    assert "dspark_jax[plot]" in cli.error_message(ModuleNotFoundError("no module", name="matplotlib"))
    assert "dspark_jax[tensorboard]" in cli.error_message(ModuleNotFoundError("no module", name="tensorboardX"))
    assert "dspark_jax[sentencepiece]" in cli.error_message(ModuleNotFoundError("x", name="google.protobuf"))
    assert "pip install foo" in cli.error_message(ModuleNotFoundError("x", name="foo.bar"))


def test_every_subcommand_takes_debug(capsys):
    for argv in (["demo", "--debug", "--help"], ["convert", "draft", "--debug", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert "--debug" in capsys.readouterr().out
