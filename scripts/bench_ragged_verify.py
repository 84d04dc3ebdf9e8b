"""Ragged vs padded verification: does the target's verify step cost what the scheduler chose to verify?

Part 1 times one jitted verify step of B rows over a warm KV cache: the padded ``[B, Bs+1]`` forward (what every
round cost before) vs the flattened ragged forward (:mod:`dspark_jax.decode.ragged`) when each row verifies its
anchor plus L drafts, for several L. Part 2 runs ``dj.speculative_generate`` end to end with a confidence threshold
(so proposal lengths vary per row and round) with ``ragged_verify`` on and off: same tokens, wall-clock ratio.

    python scripts/bench_ragged_verify.py [--hidden 256] [--layers 8] [--vocab 1024] [--batch-sizes 8,32]
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _bench_common import add_options, machine, parser
from _bench_jax import median_time, random_qwen3_config

import dspark_jax as dj
from dspark_jax.decode.ragged import ragged_buckets, verify_forward
from dspark_jax.testing import make_bigram, make_oracle_draft


def _config(args):
    """The random target of both tables (at least two query heads)."""
    return random_qwen3_config(args.hidden, args.layers, args.vocab, min_heads=2, initializer_range=0.5)


def verify_step_table(target, args):
    """Note: outside the decode loop the cache is not donated, so each layer's cache write copies the cache; inside
    the loop's while_loop it is updated in place. The end-to-end table is the one that counts."""
    width = args.block_size + 1
    taps = (0, 1)
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        rng = np.random.default_rng(0)
        ctx = jnp.asarray(rng.integers(0, args.vocab, size=(b, args.context)))
        cache = jax.jit(lambda i: target(i, target.init_cache(b, args.context + width + 1),
                                         return_logits=False).cache)(ctx)
        seq = jnp.asarray(rng.integers(0, args.vocab, size=(b, width)))
        padded = jax.jit(lambda c: target(seq, c, num_new=jnp.full((b,), width), tap_layer_ids=taps))
        t_pad = median_time(lambda: padded(cache), args.repeats)[1]
        buckets = ragged_buckets(b, width)
        ragged = jax.jit(lambda c, n: verify_forward(target, seq, n, c, taps, buckets))
        for lengths in (0, 1, 3, args.block_size):
            counts = jnp.full((b,), lengths + 1, jnp.int32)
            t_rag = median_time(lambda: ragged(cache, counts), args.repeats)[1]
            rows.append((b, lengths, b * (lengths + 1), t_pad * 1e3, t_rag * 1e3, t_pad / t_rag))
    print(f"\n### Verify step: padded [B, {width}] vs ragged (context {args.context} tokens, target H={args.hidden}, "
          f"{args.layers} layers, V={args.vocab})\n")
    print("| B | L per row | tokens verified | padded ms | ragged ms | padded / ragged |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f}x |")


def end_to_end(args):
    target = make_bigram(dj.build_target(_config(args), seed=3))
    dcfg = dj.DraftConfig(block_size=args.block_size, mask_token_id=args.vocab - 1, target_layer_ids=(0, 1),
                          num_anchors=4, markov_rank=args.vocab, enable_confidence_head=True, num_draft_layers=2)
    # an imperfect oracle: the draft's bigram table is the target's, scaled, so acceptance is partial and the
    # threshold on its (random) confidence head cuts blocks at varied lengths
    draft = make_oracle_draft(target, dj.build_draft(target, dcfg, seed=1), args.oracle_scale)
    print(f"\n### End to end: dj.speculative_generate, threshold {args.threshold}, {args.new_tokens} new tokens\n")
    print("| B | tau | mean L | padded tok/s | ragged tok/s | ragged / padded | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [list(np.random.default_rng(i).integers(0, args.vocab - 1, size=8)) for i in range(b)]
        runs = {flag: (lambda flag=flag: dj.speculative_generate(
            target, draft, prompts, max_new_tokens=args.new_tokens, threshold=args.threshold, stop_token_ids=(),
            ragged_verify=flag)) for flag in (False, True)}
        outs = {flag: [run()] for flag, run in runs.items()}       # compile
        for _ in range(args.repeats):                              # interleaved: load drifts hit both alike
            for flag, run in runs.items():
                outs[flag].append(run())
        res = {flag: (o[0], statistics.median(x.stats["tokens_per_s"] for x in o[1:])) for flag, o in outs.items()}
        same = bool(np.array_equal(res[True][0].tokens, res[False][0].tokens))
        st = res[True][0].stats
        print(f"| {b} | {st['tau']:.2f} | {st['mean_proposal']:.2f} | {res[False][1]:.0f} | {res[True][1]:.0f} | "
              f"{res[True][1] / res[False][1]:.2f}x | {same} |")


def main(argv=None):
    ap = parser(__doc__)
    add_options(ap, hidden=256, layers=8, vocab=1024, block_size=7, context=256, batch_sizes="8,32", new_tokens=48,
                threshold=0.5, oracle_scale=0.7, repeats=5, skip_end_to_end=False)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}, {jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
    verify_step_table(dj.build_target(_config(args), seed=0), args)
    if not args.skip_end_to_end:
        end_to_end(args)


if __name__ == "__main__":
    main()
