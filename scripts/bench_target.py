#!/usr/bin/env python
"""Plain autoregressive generation: ``dj.generate`` vs transformers ``model.generate``.

Builds a small random-weight Qwen3 model with transformers, saves it with ``save_pretrained`` to a
temporary directory, and times greedy generation of a fixed number of new tokens (no early stop) on the
same random prompts with

  * ours: ``dj.load_target(dir)`` + ``dj.generate`` (one warm-up call that compiles, then ``--repeats``);
  * HF:   ``Qwen3ForCausalLM.from_pretrained(dir)`` + ``model.generate`` under ``torch.no_grad``
          (one warm-up call, then ``--repeats``);

reports the median new tokens/s of each, the ratio, and whether the greedy outputs agree token for token.

Each implementation runs in its own worker subprocess (this same script with a hidden ``--worker`` flag).
On a small CPU machine the two runtimes' thread pools fight when they share a process: measured on a
2-core box, torch generate got 6-10x slower once JAX had run, and dj.generate ~1.8x slower once torch had.
Separate processes give each one the whole machine.

Thin on purpose: the model, cache and decode loop are the package's; this only builds a checkpoint,
calls ``dj.generate`` / ``model.generate`` and reports.

Example::

    .venv/bin/python scripts/bench_target.py --batch-sizes 1,8 --new-tokens 128 --json-out bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _bench_common import add_qwen3_size_options, qwen3_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark dj.generate against transformers generate on a small random Qwen3 model "
                    "(greedy, fixed number of new tokens, no early stop). Each side runs in its own subprocess.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (random weights, transformers Qwen3Config)")
    add_qwen3_size_options(g)
    g.add_argument("--model-seed", type=int, default=0, help="torch seed for the random weights")
    r = p.add_argument_group("run")
    r.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    r.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (exactly; no early stop)")
    r.add_argument("--prompt-len", type=int, default=32, help="prompt length (all rows equal, so no padding)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype for both implementations")
    r.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    r.add_argument("--prompt-seed", type=int, default=1234)
    r.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the HF worker (default: os.cpu_count())")
    r.add_argument("--skip-hf", action="store_true", help="time dj.generate only")
    r.add_argument("--json-out", default=None, help="write results as JSON here")
    # internal: run one side in a worker process
    p.add_argument("--worker", choices=["ours", "hf"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return platform.processor() or "unknown"


def _machine_busy_s():
    """Seconds of CPU time the whole machine has spent non-idle (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn, repeats):
    """One warm-up call (timed separately), then ``repeats`` timed calls.

    Returns (first_s, times, other_cpus, last_out); ``other_cpus[i]`` is how many CPUs other processes kept
    busy on average during timed run i (machine busy time minus this process's CPU time), None off Linux.
    """
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times, other = [], []
    for _ in range(repeats):
        busy, own = _machine_busy_s(), _self_cpu_s()
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        times.append(dt)
        other.append(None if busy is None else
                     round(max(_machine_busy_s() - busy - (_self_cpu_s() - own), 0.0) / dt, 3))
    return first, times, other, out


# ---- workers (each in its own process) ------------------------------------------------------------

def worker_ours(args, workdir):
    import jax
    import numpy as np

    import dspark_jax as dj

    prompts = np.load(os.path.join(workdir, "prompts.npz"))
    t = time.perf_counter()
    target = dj.load_target(os.path.join(workdir, "ckpt"), dtype=args.dtype)
    info = {"load_s": time.perf_counter() - t, "jax": jax.__version__, "dspark_jax": dj.__version__,
            "backend": jax.default_backend(),
            "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
            "threads": (f"XLA {jax.default_backend()} default intra-op pool ({os.cpu_count()} cores visible; "
                        f"XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(unset)'})"),
            "runs": {}}
    tokens = {}
    for key in prompts.files:
        rows = prompts[key].tolist()
        inner = []

        def call():
            out = dj.generate(target, rows, max_new_tokens=args.new_tokens, temperature=0.0,
                              stop_token_ids=(), seed=0)
            inner.append(out.stats["seconds"])
            return out

        first, times, other, out = _timed(call, args.repeats)
        assert out.tokens.shape == (len(rows), args.new_tokens) and (out.lengths == args.new_tokens).all(), \
            "dj.generate did not produce the requested number of tokens"
        tokens[key] = out.tokens
        info["runs"][key] = {"first_call_s": first, "times_s": times, "inner_stats_seconds": inner[1:],
                             "other_cpus": other}
        print(f"  [ours] batch {len(rows)}: first call {first:.2f}s, runs {[round(x, 3) for x in times]} "
              f"(other processes' CPUs busy per run: {other})", flush=True)
    np.savez(os.path.join(workdir, "tokens_ours.npz"), **tokens)
    with open(os.path.join(workdir, "info_ours.json"), "w") as f:
        json.dump(info, f)


def worker_hf(args, workdir):
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    prompts = np.load(os.path.join(workdir, "prompts.npz"))
    t = time.perf_counter()
    model = transformers.Qwen3ForCausalLM.from_pretrained(os.path.join(workdir, "ckpt"), dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    info = {"load_s": time.perf_counter() - t, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": f"torch.set_num_threads -> {torch.get_num_threads()} intra-op threads",
            "torch_num_threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None), "runs": {}}
    tokens = {}
    for key in prompts.files:
        ids = torch.as_tensor(prompts[key])
        attn = torch.ones_like(ids)

        def call():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=attn, do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      eos_token_id=None, pad_token_id=0)

        first, times, other, out = _timed(call, args.repeats)
        new = out[:, ids.shape[1]:].numpy()
        assert new.shape == (ids.shape[0], args.new_tokens), f"HF generated {tuple(new.shape)}"
        tokens[key] = new
        info["runs"][key] = {"first_call_s": first, "times_s": times, "other_cpus": other}
        print(f"  [hf]   batch {ids.shape[0]}: warm-up {first:.2f}s, runs {[round(x, 3) for x in times]} "
              f"(other processes' CPUs busy per run: {other})", flush=True)
    np.savez(os.path.join(workdir, "tokens_hf.npz"), **tokens)
    with open(os.path.join(workdir, "info_hf.json"), "w") as f:
        json.dump(info, f)


# ---- orchestrator -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "ours":
        worker_ours(args, args.workdir)
        return 0
    if args.worker == "hf":
        worker_hf(args, args.workdir)
        return 0

    import numpy as np
    import torch
    import transformers

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="bench_target_")
    workdir = tmp.name

    # random checkpoint, saved the HF way
    torch.manual_seed(args.model_seed)
    cfg = transformers.Qwen3Config(
        **qwen3_size(args), max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf = transformers.Qwen3ForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(os.path.join(workdir, "ckpt"))
    del hf

    rng = np.random.default_rng(args.prompt_seed)
    prompts = {f"b{b}": rng.integers(1, args.vocab_size, size=(b, args.prompt_len), dtype=np.int64)
               for b in batch_sizes}
    np.savez(os.path.join(workdir, "prompts.npz"), **prompts)

    print(f"machine: {cpu_model_name()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"model: random Qwen3, {n_params / 1e6:.1f}M params, hidden {args.hidden_size}, {args.num_layers} layers, "
          f"{args.num_heads}/{args.num_kv_heads} heads, head_dim {args.head_dim}, ffn {args.intermediate_size}, "
          f"vocab {args.vocab_size}, {args.dtype}")
    print(f"run: batch sizes {batch_sizes}, prompt {args.prompt_len}, new tokens {args.new_tokens}, greedy, "
          f"1 warm-up + {args.repeats} timed runs (median), each side in its own process\n", flush=True)

    worker_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--skip-hf"]
    sides = ["ours"] + ([] if args.skip_hf else ["hf"])
    foreign = {}
    for side in sides:
        idle_busy = _machine_busy_s()
        time.sleep(1.0)
        idle_busy = None if idle_busy is None else _machine_busy_s() - idle_busy
        if idle_busy is not None and idle_busy > 0.3:
            print(f"WARNING: before the {side} run, other processes kept {idle_busy:.2f} CPUs busy; "
                  f"timings will be noisy", flush=True)
        busy0, child0, wall0 = _machine_busy_s(), _children_cpu_s(), time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), *worker_argv, "--worker", side,
                        "--workdir", workdir], check=True)
        wall = time.perf_counter() - wall0
        if busy0 is not None:
            other = (_machine_busy_s() - busy0) - (_children_cpu_s() - child0)
            foreign[side] = {"wall_s": wall, "other_cpu_s": max(other, 0.0),
                             "other_cpus_avg": max(other, 0.0) / wall, "idle_check_busy_cpus": idle_busy}
            if other / wall > 0.1:
                print(f"WARNING: during the {side} run, other processes used {other:.1f} CPU-s "
                      f"({other / wall:.2f} CPUs on average); timings are contaminated", flush=True)
    info = {s: json.load(open(os.path.join(workdir, f"info_{s}.json"))) for s in sides}
    toks = {s: np.load(os.path.join(workdir, f"tokens_{s}.npz")) for s in sides}

    results = []
    for b in batch_sizes:
        key, total_new = f"b{b}", b * args.new_tokens
        o = info["ours"]["runs"][key]
        ours_s = statistics.median(o["times_s"])
        row = {"batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "ours_first_call_s": o["first_call_s"], "ours_compile_s_est": o["first_call_s"] - ours_s,
               "ours_times_s": o["times_s"], "ours_other_cpus": o["other_cpus"],
               "ours_inner_stats_seconds": o["inner_stats_seconds"],
               "ours_s": ours_s, "ours_min_s": min(o["times_s"]), "ours_tok_s": total_new / ours_s}
        if "hf" in info:
            h = info["hf"]["runs"][key]
            hf_s = statistics.median(h["times_s"])
            a, c = toks["ours"][key], toks["hf"][key]
            same = a == c
            row.update(hf_warmup_s=h["first_call_s"], hf_times_s=h["times_s"], hf_other_cpus=h["other_cpus"],
                       hf_s=hf_s, hf_min_s=min(h["times_s"]),
                       hf_tok_s=total_new / hf_s, ratio=hf_s / ours_s,
                       identical_rows=float(same.all(axis=1).mean()), identical_tokens=float(same.mean()),
                       first_divergence_positions=[int(np.argmin(r)) for r in same if not r.all()])
        results.append(row)

    print()
    print(f"{'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7} | {'identical rows':>14} | "
          f"{'ours 1st call s':>15}")
    print("-" * 76)
    for r in results:
        hf_tok = f"{r['hf_tok_s']:9.1f}" if "hf_tok_s" in r else f"{'-':>9}"
        ratio = f"{r['ratio']:6.2f}x" if "ratio" in r else f"{'-':>7}"
        ident = f"{r['identical_rows']:14.3f}" if "identical_rows" in r else f"{'-':>14}"
        print(f"{r['batch']:>5} | {r['ours_tok_s']:10.1f} | {hf_tok} | {ratio} | {ident} | "
              f"{r['ours_first_call_s']:15.2f}")
    print(f"\nthreads: ours: {info['ours']['threads']}")
    if "hf" in info:
        print(f"         HF:   {info['hf']['threads']} (attn {info['hf']['attn_implementation']})")
    if foreign:
        print("CPU used by other processes during each side (avg CPUs busy, machine has "
              f"{os.cpu_count()}): " + ", ".join(f"{k} {v['other_cpus_avg']:.2f}" for k, v in foreign.items()))
    print(f"versions: jax {info['ours']['jax']} on {info['ours']['devices']}"
          + (f"; torch {info['hf']['torch']}; transformers {info['hf']['transformers']}" if "hf" in info else ""))

    if args.json_out:
        machine = {"platform": platform.platform(), "python": platform.python_version(),
                   "cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
                   "jax": info["ours"]["jax"], "jax_backend": info["ours"]["backend"],
                   "device_kind": info["ours"]["devices"], "dspark_jax": info["ours"]["dspark_jax"],
                   "torch": torch.__version__, "transformers": transformers.__version__}
        doc = {"benchmark": "plain autoregressive generation: dj.generate vs transformers generate",
               "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:]),
               "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")},
               "machine": machine, "model_params": n_params,
               "threads": {s: info[s]["threads"] for s in sides},
               "load_s": {s: info[s]["load_s"] for s in sides},
               "foreign_cpu_load": foreign,
               "hf_attn_implementation": info.get("hf", {}).get("attn_implementation"),
               "results": results}
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json_out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
