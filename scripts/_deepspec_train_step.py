"""DeepSpec's own DSpark train step at bench_train_step.py's workloads: the torch side of ``bench_train_step.py
--deepspec DIR`` (run by it as a worker, under ``--deepspec-python``; not meant to be run by hand).

The model, loss and optimizer are DeepSpec's (``Qwen3DSparkModel``, ``compute_dspark_loss``; AdamW with weight decay
0 and ``clip_grad_norm_(1.0)`` as its trainer runs them, frozen embedding and lm_head), imported from the checkout
given with ``--deepspec``; nothing of DeepSpec is copied here. Same shapes as our workload, random weights from
torch's own seeds (so the losses are not comparable number for number: each side also draws its own anchors).

Its training attention is flex_attention, which has no backward on CPU in torch 2.13; here the same spec mask is
given as a dense additive mask to transformers' ``eager`` (default) or ``sdpa`` attention, as on a machine without
flex_attention. Protocol (as bench_train_step.py's own worker): prints ``ready``; then per stdin line: a workload name
-> one timed step's seconds, ``peak`` -> ``nan`` (no matmul peak measured here), ``done`` -> a JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from bench_train_step import WORKLOADS


class _Args(dict):
    """DeepSpec's config builder reads ``model_args.x`` and ``"x" in model_args``."""
    __getattr__ = dict.__getitem__


def dense_spec_mask(*, anchor_positions, block_keep_mask, seq_len, block_size, device):
    """DeepSpec's DSpark mask (a block sees the context before its anchor and its own block; dropped blocks see
    nothing) as an additive ``[B, 1, N*Bs, S + N*Bs]`` float mask for eager / sdpa attention."""
    b, n = anchor_positions.shape
    q = torch.arange(n * block_size, device=device)
    kv = torch.arange(seq_len + n * block_size, device=device)
    qb = q // block_size
    anchor = anchor_positions[:, qb]                                                     # [B, Q]
    ctx = (kv[None, None, :] < seq_len) & (kv[None, None, :] < anchor[:, :, None])
    own = (kv[None, None, :] >= seq_len) & (((kv - seq_len) // block_size)[None, None, :] == qb[None, :, None])
    ok = (ctx | own) & block_keep_mask[:, qb][:, :, None]
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[:, None]


class Workload:
    def __init__(self, name: str, attn: str, warmup: int):
        import deepspec.modeling.dspark.qwen3.modeling as modeling
        from deepspec.modeling.dspark.loss import compute_dspark_loss
        from deepspec.modeling.dspark.qwen3.config import build_draft_config
        from transformers import Qwen3Config

        if attn != "flex_attention":
            modeling.create_dspark_attention_mask = dense_spec_mask
        w = WORKLOADS[name]
        t = w["target"]
        v = t["vocab_size"]
        tcfg = Qwen3Config(**t, max_position_embeddings=4096)
        margs = _Args(num_draft_layers=w["draft_layers"], target_layer_ids=list(w["taps"]), confidence_head_alpha=1.0,
                      confidence_head_with_markov=True, markov_rank=w["rank"], markov_head_type="vanilla",
                      block_size=w["block"], mask_token_id=v - 1, num_anchors=w["anchors"])
        cfg = build_draft_config(tcfg, margs)
        cfg._attn_implementation = attn
        torch.manual_seed(0)
        self.model = modeling.Qwen3DSparkModel(cfg).train()
        self.model.set_embedding_head_trainable(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=6e-4, weight_decay=0.0)
        self.loss_fn = compute_dspark_loss
        s, h = w["seq"], t["hidden_size"]
        g = torch.Generator().manual_seed(1234)
        self.batch = dict(input_ids=torch.randint(0, v - 1, (1, s), generator=g),
                          loss_mask=torch.ones(1, s, dtype=torch.long),
                          target_hidden_states=torch.randn(1, s, len(w["taps"]) * h, generator=g),
                          target_last_hidden_states=torch.randn(1, s, h, generator=g))
        self.name, self.tokens, self.losses, self.times = name, s, [], []
        for _ in range(warmup):
            self.losses.append(self._step())

    def _step(self) -> float:
        out = self.model(**self.batch)
        loss = self.loss_fn(outputs=out, loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9,
                            confidence_head_alpha=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self) -> float:
        t0 = time.perf_counter()
        self.losses.append(self._step())
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt

    def summary(self) -> dict:
        med = float(np.median(self.times))
        return {"workload": self.name, "steps": len(self.times), "ms_per_step": 1e3 * med,
                "ms_min": 1e3 * min(self.times), "tokens_per_s": self.tokens / med, "losses": self.losses,
                "loss@1": self.losses[0], "engine": f"DeepSpec (torch {torch.__version__}, {len(self.params)} "
                f"trainable tensors, {torch.get_num_threads()} threads)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--deepspec", required=True, help="a DeepSpec checkout (the directory holding deepspec/)")
    ap.add_argument("--workload", nargs="+", default=["h256"], choices=sorted(WORKLOADS))
    ap.add_argument("--attn", default="eager", choices=("eager", "sdpa", "flex_attention"))
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.deepspec, "deepspec")):
        sys.exit(f"error: --deepspec {args.deepspec!r} holds no deepspec/ package (give a DeepSpec checkout)")
    sys.path.insert(0, os.path.abspath(args.deepspec))
    # DeepSpec's loss asks for the world size: a one-process group
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    loads = {n: Workload(n, args.attn, args.warmup) for n in args.workload}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "done":
            break
        print("nan" if cmd == "peak" else loads[cmd].step(), flush=True)
    print(json.dumps({"matmul_peak_gflops": float("nan"), "results": [w.summary() for w in loads.values()]}),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
