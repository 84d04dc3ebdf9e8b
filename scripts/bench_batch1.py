"""Where batch-1 speculative decoding gains or loses against plain decoding on the current device.

Two modes, both greedy, batch 1, speculative and plain in the same process:

  pieces (default): a random Qwen3 target of the demo's geometry (V=2048, ``--hidden-size`` 64, ``--target-layers`` 16;
    2 heads of H/2, intermediate 3H) and a random
    DSpark draft (``--block-size``, ``--draft-layers``). Each piece runs 64 times inside one jitted ``fori_loop``
    with its cache carried (updated in place, as in the decode loops): a plain decode step, target forwards of
    1, 2 and Bs+1 tokens (the verify forward), one draft proposal. Then the whole loops: ``dj.generate`` per step
    and ``dj.speculative_generate`` per round (tau ~ 1 with a random draft; a round's cost does not depend on
    the weights), and the break-even tau = round / step. Minimum over repeats (this VM's timing noise is
    one-sided).
  ``--demo WORK --draft DIR``: a trained pair from a demo work dir (``dspark demo --work WORK``): tau and
    speculative / plain tokens/s over the prompts the demo evaluates (``--dataset``) (stop tokens on, spec and plain
    alternating per prompt, outputs checked equal), then the marginal cost of a round and of a step on the first
    prompt without stop tokens: ``(t(96 tokens) - t(1 token)) / rounds``, which removes the prefill both pay.

    python scripts/bench_batch1.py [--hidden-size 64] [--target-layers 16] [--block-size 3] [--draft-layers 1]
    python scripts/bench_batch1.py --demo demo_out --draft demo_out/drafts/dspark/draft [--passes 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

import dspark_jax as dj

LOOP = 64


def _min_seconds(fn, repeats):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def pieces(args) -> None:
    from dspark_jax.config import tiny_qwen3_config
    from dspark_jax.decode.sampling import SamplingConfig, sample_tokens
    from dspark_jax.drafts.config import DraftConfig

    nl = args.target_layers
    hs = args.hidden_size
    cfg = tiny_qwen3_config(vocab_size=2048, hidden_size=hs, intermediate_size=3 * hs, num_hidden_layers=nl,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=hs // 2,
                            max_position_embeddings=1024)
    target = dj.build_target(cfg, dtype="float32")
    taps = (0, nl // 2 - 1, nl - 2)
    bs = args.block_size
    draft = dj.build_draft(target, DraftConfig(target_layer_ids=taps, block_size=bs, num_draft_layers=args.draft_layers,
                                               mask_token_id=5, markov_rank=64))
    greedy = SamplingConfig(0.0, 0, 1.0)
    t_graph, t_state = nnx.split(target)
    d_graph, d_state = nnx.split(draft)
    cap, ctx = args.capacity, 40

    def target_loop(k):
        @jax.jit
        def run(state):
            t = nnx.merge(t_graph, state)
            cache = t.init_cache(1, cap).with_lengths(jnp.array([ctx], jnp.int32))

            def body(i, carry):
                tok, cache = carry
                out = t(jnp.broadcast_to(tok[:, None], (1, k)), cache, num_new=jnp.array([k], jnp.int32),
                        tap_layer_ids=taps if k > 1 else ())
                nxt = sample_tokens(out.logits[:, -1], jax.random.key(0), greedy)
                return nxt, out.cache.with_lengths(cache.lengths + 1)    # roll back: the cache stays ~ctx long

            return jax.lax.fori_loop(0, LOOP, body, (jnp.zeros((1,), jnp.int32), cache))[0]
        return lambda: run(t_state)

    @jax.jit
    def propose_loop(state):
        d = nnx.merge(d_graph, state)
        cache = d.init_cache(1, cap).with_lengths(jnp.array([ctx], jnp.int32))
        pend = jnp.ones((1, bs + 1, len(taps) * hs), jnp.float32)

        def body(i, carry):
            tok, cache = carry
            p = d.propose(cache, pend, jnp.array([2], jnp.int32), tok, jax.random.key(0), greedy)
            return p.tokens[:, -1], p.cache.with_lengths(cache.lengths + 1)

        return jax.lax.fori_loop(0, LOOP, body, (jnp.zeros((1,), jnp.int32), cache))[0]

    us = lambda s: s / LOOP * 1e6
    print(f"# random pair: target H={hs}, {nl} layers, V=2048; DSpark draft Bs={bs}, {args.draft_layers} layer(s); "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.default_backend()}")
    print(f"plain decode step (k=1 + argmax)   {us(_min_seconds(target_loop(1), args.repeats)):7.1f} us")
    for k in sorted({2, bs + 1}):
        print(f"target forward k={k} (+ taps)       {us(_min_seconds(target_loop(k), args.repeats)):7.1f} us")
    print(f"draft proposal                     {us(_min_seconds(lambda: propose_loop(d_state), args.repeats)):7.1f} us")
    prompt = [list(range(10, 40))]
    kw = dict(max_new_tokens=96, stop_token_ids=())
    step = _best(lambda: dj.generate(target, prompt, **kw), args.repeats, per="decode_steps")
    rnd = _best(lambda: dj.speculative_generate(target, draft, prompt, **kw), args.repeats, per="rounds")
    print(f"whole loops: generate {step * 1e6:.1f} us/step, speculative {rnd * 1e6:.1f} us/round "
          f"-> break-even tau {rnd / step:.2f}")


def _best(generate, repeats, per=None):
    """Minimum over ``repeats`` calls (after one warm-up) of a generate call's timed seconds, optionally divided by
    one of its stats (``decode_steps`` / ``rounds``)."""
    generate()
    return min(o.stats["seconds"] / (o.stats[per] if per else 1) for o in (generate() for _ in range(repeats)))


def demo_pair(args) -> None:
    from dspark_jax.eval import datasets as D

    target = dj.load_target(os.path.join(args.demo, "target"))
    draft = dj.load_draft(args.draft, dtype="float32")
    texts = D.load_prompts(os.path.join(args.demo, "eval_data"), args.dataset, args.samples, args.seed)
    prompts = [D.chat_prompt_ids(target.tokenizer, t) for t in texts]
    cfg = draft.config
    print(f"# demo pair {args.demo}, draft {args.draft} (Bs={cfg.ttt_length if cfg.is_eagle3 else cfg.block_size}, "
          f"{cfg.num_draft_layers} layer(s)); {len(prompts)} {args.dataset} prompts, 96 new tokens; "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.default_backend()}")
    kw = dict(max_new_tokens=96, stop_token_ids=tuple(target.config.eos_token_ids))
    for p in prompts:                               # compile every prompt bucket first
        dj.speculative_generate(target, draft, [p], **kw)
        dj.generate(target, [p], **kw)
    for i in range(args.passes):
        s_sec = s_tok = p_sec = p_tok = accepted = rounds = 0
        for p in prompts:
            s = dj.speculative_generate(target, draft, [p], **kw)
            g = dj.generate(target, [p], **kw)
            if s.token_lists() != g.token_lists():
                raise AssertionError("speculative output differs from plain greedy output")
            s_sec += s.stats["seconds"]
            s_tok += int(s.lengths.sum())
            p_sec += g.stats["seconds"]
            p_tok += int(g.lengths.sum())
            accepted += int(s.accept_lengths.sum())
            rounds += int((s.accept_lengths > 0).sum())
        print(f"pass {i}: tau {accepted / rounds:.2f}; speculative {s_tok / s_sec:.0f} tok/s, "
              f"plain {p_tok / p_sec:.0f} tok/s: {s_tok / s_sec / (p_tok / p_sec):.2f}x")
    p = prompts[0]
    secs = {}
    for n in (1, 96):
        kw = dict(max_new_tokens=n, stop_token_ids=())
        secs["spec", n] = _best(lambda: dj.speculative_generate(target, draft, [p], **kw), args.repeats * 3)
        secs["plain", n] = _best(lambda: dj.generate(target, [p], **kw), args.repeats * 3)
    n_rounds = dj.speculative_generate(target, draft, [p], max_new_tokens=96, stop_token_ids=()).stats["rounds"]
    rnd = (secs["spec", 96] - secs["spec", 1]) / n_rounds
    step = (secs["plain", 96] - secs["plain", 1]) / 95
    print(f"first prompt, no stop tokens, 96 tokens: speculative {secs['spec', 96] * 1e3:.2f} ms ({n_rounds} rounds, "
          f"tau {96 / n_rounds:.2f}), plain {secs['plain', 96] * 1e3:.2f} ms "
          f"({secs['plain', 96] / secs['spec', 96]:.2f}x); marginal round {rnd * 1e6:.0f} us, step {step * 1e6:.0f} us "
          f"-> break-even tau {rnd / step:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--target-layers", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=3)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--capacity", type=int, default=256, help="KV cache slots of the pieces (40 in use)")
    ap.add_argument("--demo", help="a demo work dir (trained pair mode)")
    ap.add_argument("--draft", help="a draft dir (with --demo); default: <demo>/drafts/dspark/draft")
    ap.add_argument("--samples", type=int, default=64, help="prompts (the demo evaluates 64 held-out ones)")
    ap.add_argument("--dataset", default="heldout", choices=("heldout", "humaneval", "mbpp"),
                    help="which of the demo's evaluation sets (<demo>/eval_data)")
    ap.add_argument("--seed", type=int, default=0, help="the demo's prompt-shuffle seed")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.demo:
        args.draft = args.draft or os.path.join(args.demo, "drafts", "dspark", "draft")
        for path in (os.path.join(args.demo, "target"), args.draft):
            if not os.path.isdir(path):
                raise SystemExit(f"bench_batch1: {path} does not exist (run `dspark demo --work {args.demo}` first)")
        demo_pair(args)
    else:
        pieces(args)


if __name__ == "__main__":
    main()
