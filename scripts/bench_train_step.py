"""One DSpark train step at a fixed workload: ms/step, tokens/s, XLA's FLOP count, achieved GFLOP/s and the
fraction of this machine's measured fp32 matmul peak (issue 28's side-by-side workload with DeepSpec).

Workloads (random weights and inputs from fixed seeds; fp32 unless ``--dtype bfloat16``; target features given
as from an offline cache, so the step is draft forward + DSpark loss + backward + clip 1.0 + AdamW):

* ``h256``: Qwen3 target H=256, 8 layers, 4 query / 2 KV heads, head_dim 64, FFN 768, V=8192; DSpark draft of 3
  layers, block 7, vanilla Markov head r=64, confidence head with Markov features, taps (1, 3, 5) (DeepSpec's
  rule for 8 target layers); one sequence S=512, loss mask all ones, 64 anchors.
* ``tiny``: H=64, 6 target layers, 4 / 2 heads of 16, FFN 192, V=512; the same draft shape with r=16, taps
  (1, 2, 3); S=128, 16 anchors.

Each workload is timed step by step (``block_until_ready`` after each) for ``--steps`` steps after
``--warmup``; the median is reported. ``loss@1`` / ``loss@k`` are the step losses (same seeds -> same numbers,
so two code versions can be held to the same loss). The matmul peak is the median of a ``[n, n] x [n, n]`` fp32
product timed in the same process.

``--baseline-tree DIR``: also time another checkout of the package (e.g. ``git archive main dspark_jax``): two
worker processes, one per tree, are driven one step at a time in alternation, so both see the same load on a
shared machine; prints both medians, their ratio and the largest loss difference.

``--deepspec DIR``: the baseline is DeepSpec's own torch train step at the same shapes (``scripts/
_deepspec_train_step.py``, importing DeepSpec from the checkout DIR, run by ``--deepspec-python``: a venv with
``torch==2.13.0`` (CPU wheel) and ``transformers==5.10.2``), driven step by step in alternation with ours the same
way. Its weights and anchors are its own (random, fixed seeds), so only the times compare. Usage::

    python scripts/bench_train_step.py [--workload h256 tiny] [--steps 20] [--warmup 3] [--vocab-chunk N]
        [--cpu-buffers keep|default] [--baseline-cpu-buffers keep|default]
        [--baseline-tree DIR | --deepspec DIR [--deepspec-python PY] [--deepspec-attn eager|sdpa]] [--json-out FILE]

``--cpu-buffers keep`` (default) applies in each worker what ``dspark train`` applies on CPU when a step's
temporaries pass 32 MiB (``dspark_jax/host_memory.py``: h256's are 120.7 MB, tiny's a few MB, so ``dspark train``
would keep them for h256 only); ``default`` leaves JAX's and glibc's defaults. ``--baseline-cpu-buffers default``
alone times this tree both ways in alternation.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
from _bench_common import machine, parser, write_json

WORKLOADS = {
    "h256": dict(target=dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64),
                 taps=(1, 3, 5), draft_layers=3, block=7, rank=64, seq=512, anchors=64),
    "tiny": dict(target=dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                 taps=(1, 2, 3), draft_layers=3, block=7, rank=16, seq=128, anchors=16),
}


def matmul_peak_gflops(n: int = 1024, reps: int = 10) -> float:
    """Median GFLOP/s of an ``[n, n] @ [n, n]`` fp32 product on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times)) / 1e9


def build(name: str, dtype: str, vocab_chunk: int | None, step_kwargs: dict):
    """-> (step_fn, state, batch, tokens per step) for workload ``name``."""
    import jax
    import jax.numpy as jnp

    import dspark_jax as dj
    from dspark_jax.config import tiny_qwen3_config
    from dspark_jax.drafts.config import DraftConfig
    from dspark_jax.train.schedule import make_optimizer
    from dspark_jax.train.step import init_train_state, make_train_step

    w = WORKLOADS[name]
    tcfg = tiny_qwen3_config(**w["target"], max_position_embeddings=4096)
    target = dj.build_target(tcfg, seed=0, dtype=dtype) if "seed" in inspect.signature(dj.build_target).parameters \
        else dj.build_target(tcfg, dtype=dtype)
    v, h, s = tcfg.vocab_size, tcfg.hidden_size, w["seq"]
    dcfg = DraftConfig(block_size=w["block"], mask_token_id=v - 1, target_layer_ids=w["taps"],
                       num_anchors=w["anchors"], markov_rank=w["rank"], markov_head_type="vanilla",
                       enable_confidence_head=True, confidence_head_with_markov=True,
                       num_draft_layers=w["draft_layers"])
    draft = dj.build_draft(target, dcfg, seed=0, dtype=dtype, param_dtype="float32")
    opt = make_optimizer(6e-4, 1000, clip=1.0)
    known = inspect.signature(make_train_step).parameters
    kw = {k: val for k, val in step_kwargs.items() if k in known}
    step = make_train_step(None, draft, opt, vocab_chunk=vocab_chunk, **kw)
    state = init_train_state(draft, opt, seed=0)
    k1, k2, k3 = jax.random.split(jax.random.key(1234), 3)
    batch = {"input_ids": jax.random.randint(k1, (1, s), 0, v - 1, jnp.int32),
             "loss_mask": jnp.ones((1, s), jnp.int32),
             "target_hidden_states": jax.random.normal(k2, (1, s, len(w["taps"]) * h), dtype),
             "target_last_hidden_states": jax.random.normal(k3, (1, s, h), dtype)}
    return step, state, batch, s


def cpu_buffers(args) -> str:
    """``--cpu-buffers keep``: what ``dspark train`` applies on CPU (dspark_jax/host_memory.py) -> its status."""
    if args.cpu_buffers != "keep":
        return "off: --cpu-buffers default"
    try:
        from dspark_jax.host_memory import keep_cpu_step_buffers
    except ImportError:   # an older tree (--baseline-tree)
        return "off: not in this tree"
    return keep_cpu_step_buffers()


def run_local(args) -> dict:
    import jax

    buffers = cpu_buffers(args)
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    peak = matmul_peak_gflops(args.peak_n)
    out = {"machine": machine(), "cpus": os.cpu_count(),
           "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__, "dtype": args.dtype,
           "vocab_chunk": args.vocab_chunk, "cpu_step_buffers": buffers, "matmul_peak_gflops": peak, "results": []}
    for name in args.workload:
        w = Workload(name, args)
        for _ in range(args.steps):
            w.step()
        out["results"].append(w.summary(peak))
    return out


class Workload:
    """A built, compiled and warmed-up workload that times one step per :meth:`step` call."""

    def __init__(self, name: str, args):
        import jax

        self.name = name
        kw = {"remat": args.remat} if args.remat != "none" else {}
        self.fn, self.state, self.batch, self.tokens = build(name, args.dtype, args.vocab_chunk, kw)
        t0 = time.perf_counter()
        compiled = self.fn.jitted.lower(self.state, None, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        self.losses, self.times = [], []
        for _ in range(args.warmup):
            self.state, m = self.fn(self.state, None, self.batch)
            self.losses.append(float(m["loss"]))
        jax.block_until_ready(self.state)

    def step(self) -> float:
        import jax

        t0 = time.perf_counter()
        self.state, m = self.fn(self.state, None, self.batch)
        jax.block_until_ready((self.state, m))
        dt = time.perf_counter() - t0
        self.times.append(dt)
        self.losses.append(float(m["loss"]))
        return dt

    def summary(self, peak: float) -> dict:
        med = float(np.median(self.times))
        return {"workload": self.name, "steps": len(self.times), "ms_per_step": 1e3 * med,
                "ms_min": 1e3 * min(self.times), "tokens_per_s": self.tokens / med, "xla_gflop": self.flops / 1e9,
                "achieved_gflops": self.flops / med / 1e9, "fraction_of_peak": self.flops / med / 1e9 / peak,
                "compile_s": self.compile_s, "loss@1": self.losses[0], "losses": self.losses}


def worker(args) -> None:
    """``--worker``: build every workload, then per stdin line ``<workload>`` time one step and reply with its
    seconds; ``peak`` re-measures the matmul peak; ``done`` prints the summary and exits."""
    import jax

    buffers = cpu_buffers(args)
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    loads = {n: Workload(n, args) for n in args.workload}
    peaks = [matmul_peak_gflops(args.peak_n)]
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            break
        if cmd == "peak":
            peaks.append(matmul_peak_gflops(args.peak_n))
            print(peaks[-1], flush=True)
        else:
            print(loads[cmd].step(), flush=True)
    peak = float(np.median(peaks))
    print(json.dumps({"matmul_peak_gflops": peak, "cpu_step_buffers": buffers,
                      "results": [w.summary(peak) for w in loads.values()]}), flush=True)


def compare(args) -> dict:
    """Baseline tree and current tree in two worker processes, driven one step at a time in alternation (the
    order flips every step), so both see the same machine load; medians of the per-step times."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.abspath(__file__), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--peak-n", str(args.peak_n), "--remat", args.remat, "--workload", *args.workload, "--worker"]
    if args.vocab_chunk:
        cmd += ["--vocab-chunk", str(args.vocab_chunk)]
    base_buffers = args.baseline_cpu_buffers or args.cpu_buffers
    if args.deepspec:   # DeepSpec's torch step as the baseline, in its own interpreter (a torch venv)
        ds = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_deepspec_train_step.py")
        base_cmd = [args.deepspec_python, ds, "--deepspec", os.path.abspath(args.deepspec), "--attn",
                    args.deepspec_attn, "--warmup", str(args.warmup), "--workload", *args.workload]
        launches = {"baseline": (base_cmd, dict(os.environ)),
                    "current": (cmd + ["--cpu-buffers", args.cpu_buffers], dict(os.environ, PYTHONPATH=here))}
    else:   # --baseline-tree, or this tree under --baseline-cpu-buffers
        tree = os.path.abspath(args.baseline_tree) if args.baseline_tree else here
        launches = {"baseline": (cmd + ["--cpu-buffers", base_buffers], dict(os.environ, PYTHONPATH=tree)),
                    "current": (cmd + ["--cpu-buffers", args.cpu_buffers], dict(os.environ, PYTHONPATH=here))}
    procs = {}
    for which, (argv, env) in launches.items():   # built one after the other: compiles do not overlap
        procs[which] = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        bufsize=1)
        while (line := procs[which].stdout.readline()).strip() != "ready":
            if not line:   # its own error is on stderr, above
                sys.exit(f"error: the {which} worker exited before it was ready (exit code {procs[which].wait()})")

    def ask(which, line):
        procs[which].stdin.write(line + "\n")
        procs[which].stdin.flush()
        return procs[which].stdout.readline().strip()

    order = list(launches)
    for name in args.workload:
        for i in range(args.steps):
            for which in (order if i % 2 == 0 else order[::-1]):
                ask(which, name)
        for which in order:
            ask(which, "peak")
    runs = {}
    for which in order:
        procs[which].stdin.write("done\n")
        procs[which].stdin.flush()
        runs[which] = json.loads(procs[which].stdout.read().strip().splitlines()[-1])
        procs[which].wait()
    summary = {}
    for name in args.workload:
        row = {w: next(x for x in runs[w]["results"] if x["workload"] == name) for w in order}
        row["speedup"] = row["baseline"]["ms_per_step"] / row["current"]["ms_per_step"]
        row["speedup_min"] = row["baseline"]["ms_min"] / row["current"]["ms_min"]
        n = min(len(row["baseline"]["losses"]), len(row["current"]["losses"]))
        # DeepSpec's side has its own random weights and anchors: its losses are not ours number for number
        row["max_abs_loss_diff"] = None if args.deepspec else float(np.max(np.abs(np.subtract(
            row["baseline"]["losses"][:n], row["current"]["losses"][:n]))))
        summary[name] = row
    return {"machine": machine(), "cpus": os.cpu_count(), "dtype": args.dtype,
            "vocab_chunk": args.vocab_chunk, "steps": args.steps,
            "matmul_peak_gflops": {w: runs[w]["matmul_peak_gflops"] for w in order},
            "cpu_step_buffers": {w: runs[w].get("cpu_step_buffers", "off: not reported") for w in order},
            "workloads": summary}


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--workload", nargs="+", default=["h256", "tiny"], choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--vocab-chunk", type=int, default=None, help="chunked vocab loss (default: materialised logits)")
    ap.add_argument("--remat", default="none", help="draft-layer remat policy (none / dots / layers)")
    ap.add_argument("--cpu-buffers", default="keep", choices=("keep", "default"),
                    help="keep: what `dspark train` does on CPU (synchronous CPU client, glibc keeps the step's "
                         "temporary buffer: dspark_jax/host_memory.py); default: JAX's and glibc's defaults")
    ap.add_argument("--baseline-cpu-buffers", default=None, choices=("keep", "default"),
                    help="the baseline worker's --cpu-buffers (default: the same); without --baseline-tree the "
                         "baseline is this tree, so this alone compares the two settings")
    ap.add_argument("--peak-n", type=int, default=1024, help="matmul size for the measured peak")
    ap.add_argument("--baseline-tree", default=None, help="another checkout of the repo to compare against")
    ap.add_argument("--deepspec", default=None,
                    help="a DeepSpec checkout: its own torch train step is the baseline (same shapes)")
    ap.add_argument("--deepspec-python", default=sys.executable,
                    help="the interpreter for DeepSpec's side (a venv with torch and transformers 5.10.2)")
    ap.add_argument("--deepspec-attn", default="eager", choices=("eager", "sdpa"),
                    help="DeepSpec's attention (its flex_attention has no backward on CPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.baseline_tree and args.deepspec:
        ap.error("give --baseline-tree or --deepspec, not both")
    if args.baseline_cpu_buffers and args.deepspec:
        ap.error("--baseline-cpu-buffers is for our own step (DeepSpec's worker is torch)")
    paired = args.baseline_tree or args.deepspec or args.baseline_cpu_buffers
    res = compare(args) if paired else run_local(args)
    if args.json:
        print(json.dumps(res))
    else:
        slim = json.loads(json.dumps(res))
        for r in slim.get("results", []):
            r.pop("losses")
        for w in slim.get("workloads", {}).values():
            for k in ("baseline", "current"):
                w[k].pop("losses")
        print(json.dumps(slim, indent=2))
    write_json(args.json_out, res)


if __name__ == "__main__":
    main()
