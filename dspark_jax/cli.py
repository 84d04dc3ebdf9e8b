"""The ``dspark`` command line: ``demo``, ``generate``, ``eval``, ``generate-data``, ``train``, ``prepare-cache``,
``calibrate``, ``profile``, ``convert draft``, ``inspect``.

Every command prints a human summary and writes machine-readable JSON beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from dspark_jax.config import ConfigError, read_config_json
from dspark_jax.convert.formats import (
    FORMAT_LABELS,
    FORMATS,
    describe,
    export_draft,
    format_description,
    load_checkpoint,
    plan_export,
    read_checkpoint,
)
from dspark_jax.convert.hf import load_target
from dspark_jax.convert.safetensors_io import CheckpointError
from dspark_jax.decode.autoregressive import generate
from dspark_jax.decode.profile import add_profile_parser
from dspark_jax.decode.synthetic import add_generate_data_parser
from dspark_jax.demo.pipeline import FULL, QUICK, Demo
from dspark_jax.distributed import (
    DistributedError,
    add_distributed_args,
    config_from_args,
    failing_fast,
    initialize,
    is_initialized,
)
from dspark_jax.eval.calibrate import add_calibrate_parser
from dspark_jax.eval.run import add_eval_parser
from dspark_jax.targets.registry import config_from_hf_dict, target_config_from_json
from dspark_jax.train.cli import add_train_parsers


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-token-ids", type=str, default=None,
                   help="comma-separated ids; default: the config's eos_token_id; '' = never stop early")


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated integers, got {text!r}") from None


def _stop_ids(arg):
    return None if arg is None else _parse_ids(arg, "--stop-token-ids")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def cmd_demo(args) -> int:
    """The whole workflow on an embedded default: stdlib corpus -> tokenizer + target trained from scratch ->
    regenerated data -> DSpark / DFlash / Eagle3 drafts -> evaluation (τ, speculative vs plain tokens/s)."""
    settings = QUICK if args.quick else FULL
    if args.target_family != settings.target_family:
        settings = dataclasses.replace(settings, target_family=args.target_family)
    Demo(args.work, settings, progress=not args.no_progress).run()
    return 0


def _read_prompts(args) -> list:
    prompts: list = []
    if args.prompt:
        prompts.extend(args.prompt)
    if args.prompt_ids:
        prompts.extend(_parse_ids(p, "--prompt-ids") for p in args.prompt_ids)
    if args.prompts_file:
        if not os.path.exists(args.prompts_file):
            raise SystemExit(f"error: --prompts-file {args.prompts_file!r} does not exist")
        with open(args.prompts_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {args.prompts_file}:{n}: not valid JSON ({e.msg})") from None
                if isinstance(rec, dict):
                    rec = rec.get("input_ids", rec.get("prompt", rec.get("text")))
                if not isinstance(rec, (str, list)):
                    raise SystemExit(f"error: {args.prompts_file}:{n}: expected a string, a list of ids, or an "
                                     "object with 'prompt'/'text'/'input_ids'")
                prompts.append(rec)
    if not prompts:
        raise SystemExit("error: give at least one of --prompt, --prompt-ids, --prompts-file")
    return prompts


def cmd_generate(args) -> int:
    target = load_target(args.target, dtype=args.dtype)
    prompts = _read_prompts(args)
    out = generate(target, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_token_ids=_stop_ids(args.stop_token_ids),
                   seed=args.seed)
    rows = out.token_lists()
    for i, toks in enumerate(rows):
        text = f" {out.texts[i]!r}" if out.texts else ""
        print(f"[{i}] {len(toks)} tokens:{text} {toks if not text else ''}".rstrip())
    print(f"{out.stats['new_tokens']} tokens in {out.stats['seconds']:.2f}s "
          f"({out.stats['tokens_per_s']:.1f} tokens/s, compilation included on a first call)")
    if args.out:
        _write_json(args.out, {"tokens": rows, "texts": out.texts, "stats": out.stats})
        print(f"wrote {args.out}")
    return 0


def _read_vocab_file(path: str) -> list[int]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --draft-vocab {path!r} does not exist")
    try:
        with open(path) as f:
            ids = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --draft-vocab {path}: not valid JSON ({e.msg})") from None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SystemExit(f"error: --draft-vocab {path}: expected a JSON list of target token ids")
    return ids


def cmd_convert_draft(args) -> int:
    """Converts a draft checkpoint between formats. The input format is detected from config.json; what the
    output format cannot represent is refused with the reason (pruning only with --draft-vocab)."""
    src, dst = os.path.abspath(args.input), os.path.abspath(args.output)
    if src == dst:
        raise SystemExit("error: OUT must differ from IN")
    if os.path.isdir(dst) and os.listdir(dst) and not args.overwrite:
        raise SystemExit(f"error: {args.output!r} exists and is not empty (pass --overwrite to replace its files)")
    vocab = _read_vocab_file(args.draft_vocab) if args.draft_vocab else None
    try:
        ck = read_checkpoint(args.input, target=args.target)
        plan_export(ck.config, args.to, pruned=vocab is not None or ck.config.draft_vocab is not None,
                    allow_nonstandard=args.allow_nonstandard)
        keeps_shared = args.to in ("deepspec", "speculators")
        if ck.shared and keeps_shared and args.target is None:
            raise SystemExit(f"error: {args.input} ({ck.label}) does not store {', '.join(ck.shared)}; the "
                             f"{FORMAT_LABELS[args.to]} format does: pass --target DIR (the target model)")
        draft = load_checkpoint(ck, target=args.target, shared_placeholder=not keeps_shared and args.target is None)
        export_draft(draft, args.output, args.to, draft_vocab=vocab, allow_nonstandard=args.allow_nonstandard,
                     verifier=args.verifier, store_embedding=args.store_embedding)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.input}: {ck.label} -> {args.output}: {FORMAT_LABELS[args.to]}")
    return 0


def cmd_inspect(args) -> int:
    """Prints what a draft checkpoint is: format, algorithm, conventions, shapes, which target it fits."""
    try:
        tcfg = target_config_from_json(args.target) if args.target else None
        ck = read_checkpoint(args.dir, target=tcfg)
    except ConfigError as e:
        try:    # a target checkpoint is worth naming as such rather than "unknown draft format"
            d, _ = read_config_json(args.dir)
            t = config_from_hf_dict(d)
        except (ConfigError, FileNotFoundError):
            raise SystemExit(f"error: {e}") from None
        print(f"{args.dir}: a {t.model_type} target model ({t.num_hidden_layers} layers, hidden {t.hidden_size}, "
              f"vocab {t.vocab_size}), not a draft")
        return 0
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    info = describe(ck, tcfg)
    print(format_description(info))
    if args.json:
        _write_json(args.json, info)
        print(f"wrote {args.json}")
    return 0


def add_format_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between formats", description="Checkpoint conversion.")
    csub = p.add_subparsers(dest="what", required=True)
    c = csub.add_parser("draft", help="convert a draft (DeepSpec / SpecForge / speculators / z-lab)",
                        description=cmd_convert_draft.__doc__)
    c.add_argument("input", metavar="IN", help="draft directory (config.json + safetensors), any supported format")
    c.add_argument("output", metavar="OUT", help="output directory")
    c.add_argument("--to", required=True, choices=FORMATS, help="output format")
    c.add_argument("--target", help="target HF directory: fills the embedding / LM head for formats that do not "
                   "store them and checks that the draft fits")
    c.add_argument("--draft-vocab", help="JSON list of target token ids: prune the draft vocabulary to them "
                   "(speculators, and SpecForge Eagle3; d2t/t2d)")
    c.add_argument("--verifier", help="speculators verifier.name_or_path (the target's hub name)")
    c.add_argument("--allow-nonstandard", action="store_true", help="--to deepspec: write a bonus-anchor draft "
                   "with 'sample_from_anchor: false' (read here and by vLLM, ignored by DeepSpec's own code)")
    c.add_argument("--store-embedding", action="store_true", help="--to specforge, Eagle3: also write "
                   "embed_tokens.weight (SpecForge leaves the frozen embedding out by default)")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    c.set_defaults(func=cmd_convert_draft)

    p = sub.add_parser("inspect", help="what a draft checkpoint is", description=cmd_inspect.__doc__)
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--target", help="target HF directory (or its config.json): check that the draft fits it")
    p.add_argument("--json", help="also write the description as JSON here")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__,
                                     epilog="Errors in the input print one 'error: ...' line and exit 2; --debug "
                                            "(anywhere on the line) shows the traceback.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job on an embedded default (no downloads)",
                       description=cmd_demo.__doc__)
    p.add_argument("--work", default="demo_out", help="work directory; every stage is cached there and a rerun "
                   "resumes (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="a few-minute version with tiny sizes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--target-family", choices=("qwen3", "deepseek_v3"), default="qwen3",
                   help="the tiny target's family (default qwen3; deepseek_v3: MLA + DeepSeekMoE)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="plain autoregressive generation with a target",
                       description="Plain autoregressive generation from an HF checkpoint directory.")
    p.add_argument("--target", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt", action="append", help="a text prompt (needs a tokenizer in the target dir)")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids")
    p.add_argument("--prompts-file", help="jsonl: one prompt per line (string, id list, or {'prompt': ...})")
    p.add_argument("--out", help="write results as JSON here")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    add_eval_parser(sub)            # dspark eval: acceptance metrics + speculative vs plain tokens/s
    add_generate_data_parser(sub)   # dspark generate-data: regenerate training conversations with the target
    add_train_parsers(sub)          # dspark train, dspark prepare-cache

    add_calibrate_parser(sub)       # dspark calibrate: STS temperatures for the draft's confidence head
    add_profile_parser(sub)         # dspark profile: SPS(B) table for the prefix scheduler
    add_format_parsers(sub)         # dspark convert draft, dspark inspect: draft checkpoint formats

    for name in JOINS_FROM_FLAGS:
        add_distributed_args(sub.choices[name])
    _add_debug_flag(parser)
    for p in _leaf_parsers(parser):     # `dspark generate --debug ...` as well as `dspark --debug generate ...`
        _add_debug_flag(p, default=argparse.SUPPRESS)
    return parser


# commands that join a multi-process run from their flags alone, before they run (train and prepare-cache also
# read their config's distributed section, so they join inside their command)
JOINS_FROM_FLAGS = ("generate-data", "eval", "calibrate", "profile")


# Errors that describe bad input or the environment (missing files, a full disk, an unreachable hub), not a defect
# of the code: one ``error:`` line, no traceback. The project's own error classes (ConfigError, CheckpointError,
# DataError, CacheError, DatasetError, FormatError) all derive from ValueError, as do the input checks of
# dj.generate / dj.speculative_generate.
USER_ERRORS = (ValueError, OSError)

# Optional dependencies: the extra that brings each in, named when one is missing.
OPTIONAL_MODULES = {"matplotlib": "plot", "tensorboardX": "tensorboard", "sentencepiece": "sentencepiece",
                    "google.protobuf": "sentencepiece", "google": "sentencepiece"}


def _add_debug_flag(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error (also DSPARK_DEBUG=1)")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every (sub)command parser below ``parser``, nested ones (``convert draft``) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield child
                yield from _leaf_parsers(child)


def error_message(exc: BaseException) -> str:
    """The one line a user sees for ``exc``: its message, and for a missing optional module the extra to install."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.split(".")[0]
        extra = OPTIONAL_MODULES.get(exc.name) or OPTIONAL_MODULES.get(root)
        how = f"pip install 'dspark_jax[{extra}]'" if extra else f"pip install {root}"
        return f"the Python module '{exc.name}' is not installed ({how})"
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    return msg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DSPARK_DEBUG", "") not in ("", "0")
    if args.command in JOINS_FROM_FLAGS:
        try:
            initialize(config_from_args(args))  # before anything starts the JAX backend
        except DistributedError as e:
            raise SystemExit(f"error: {e}") from None
    with failing_fast():  # a process of a multi-process run that fails must not leave its peers hanging
        try:
            return args.func(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print("error: interrupted", file=sys.stderr)
            code = 130
        except (*USER_ERRORS, ModuleNotFoundError) as e:
            if debug:
                raise
            print(f"error: {error_message(e)}", file=sys.stderr)
            code = 2
        if is_initialized():
            raise SystemExit(code)   # failing_fast leaves at once instead of waiting for the peers
        return code


if __name__ == "__main__":
    sys.exit(main())
