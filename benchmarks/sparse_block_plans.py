"""Are fewer pairs faster: the sparse kernel on the engine's plans against pooled block plans of the same rows.

sparse_oracle.py found that a block estimate (256-row blocks of 64-key groups, each head and block keeping its
best groups by every row's score against the groups' mean keys, "pooled") reaches the engine's recall with fewer
pairs. Its plans are many short key ranges, which the kernel computes at a higher cost per pair than the engine's
bands and columns. This times both, side by side on the same rows: one prefill of the perplexity document with DCA
and sparse prefill on (mass 0.95); at the last piece of each chosen layer, the dense attention of the piece, the
engine's estimate and plan (mass 0.95) and its kernel, and the pooled estimate and plan at several cut-offs and
their kernel, best of `--repeat`, with each plan's density and recall exp(lse_sparse - lse_dense).

  python benchmarks/sparse_block_plans.py --model M.gguf --length 30720 --layers 2,5,9,13,15,18 --cutoffs 0.8,0.9,0.95
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import megactx.sparse.prefill as prefill  # noqa: E402
from megactx import LLM, SamplingParams  # noqa: E402
from megactx.eval.ppl import document_ids  # noqa: E402
from megactx.sparse.kernel import sparse_attention  # noqa: E402
from megactx.sparse.plan import BlockKeys, _list_runs, _merge, block_starts, plan_density  # noqa: E402
from sparse_oracle import block_cut, group_means, pooled_scores  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 256


def pooled_plan(segments, k: torch.Tensor, q_start: int, n: int, scale: float, cutoff: float):
    """The pooled block plan: per head and 256-row block, the best 64-key groups before the block until their summed
    pooled score reaches `cutoff` of what all groups before it score (the first group always), as key ranges;
    the kernel computes the block's own keys anyway."""
    starts = block_starts(q_start, n, BLOCK)
    means, size = group_means(k[:, :q_start + n])
    score = torch.stack([pooled_scores([(lo, hi, q[a - q_start:a - q_start + BLOCK]) for lo, hi, q in segments],
                                       means, size, torch.arange(a, min(a + BLOCK, q_start + n)), scale).sum(1)
                         for a in starts], 1)  # [H, B, groups]
    visible = torch.arange(score.shape[-1])[None, :] * 64 < torch.tensor(starts)[:, None]  # groups before the block
    forced = torch.zeros_like(visible)
    forced[:, 0] = True
    chosen = block_cut(score.masked_fill(~visible[None], 0), cutoff, forced) & visible[None]
    empty = torch.empty(0, dtype=torch.long)
    return [[BlockKeys(_merge([(lo * 64, min(hi * 64, a)) for lo, hi in _list_runs(chosen[h, i].nonzero().flatten()
                                                                                  .tolist())]), empty)
             for i, a in enumerate(starts)] for h in range(score.shape[0])]


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def measure(sp, layer, segments, estimate_segments, keys, q_start, dense, cutoffs, repeat) -> list[dict]:
    n = segments[0][2].shape[0]
    k = keys.span(0, q_start + n)[0]
    t_dense, (_, lse_dense) = best_of(repeat, dense)
    rows = [{"layer": layer, "plan": "dense", "density": 1.0, "recall": 1.0, "estimate_s": 0.0,
             "kernel_s": round(t_dense, 3)}]
    cfg = sp.cfg
    sp.cfg = dataclasses.replace(cfg, mass=0.95)
    t_est, plan = best_of(repeat, lambda: sp.plan(layer, segments, estimate_segments, keys, q_start, n, ()))
    sp.cfg = cfg
    candidates = [("engine, mass 0.95", t_est, plan)]
    for cutoff in cutoffs:
        t_est, plan = best_of(repeat, lambda: pooled_plan(segments, k, q_start, n, sp.scale, cutoff))
        candidates.append((f"pooled, cut-off {cutoff}", t_est, plan))
    for name, t_est, plan in candidates:
        t_kernel, (_, lse) = best_of(repeat, lambda: sparse_attention(segments, keys, plan, q_start, BLOCK, sp.scale))
        rows.append({"layer": layer, "plan": name, "density": round(plan_density(plan, q_start, n, BLOCK), 4),
                     "recall": round(float((lse - lse_dense).exp().mean()), 4), "estimate_s": round(t_est, 3),
                     "kernel_s": round(t_kernel, 3)})
    return rows


def table(rows: list[dict]) -> list[str]:
    dense = {r["layer"]: r["kernel_s"] for r in rows if r["plan"] == "dense"}
    out = ["| layer | plan | density | recall | estimate + plan s | kernel s | (estimate + kernel) / dense |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['plan']} | {r['density']:.3f} | {r['recall']:.4f} | {r['estimate_s']:.2f} | "
                   f"{r['kernel_s']:.2f} | {(r['estimate_s'] + r['kernel_s']) / dense[r['layer']]:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=30720, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--layers", default="2,5,9,13,15,18")
    ap.add_argument("--cutoffs", default="0.8,0.9,0.95")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse_block_plans.json"))
    args = ap.parse_args()
    only = {int(x) for x in args.layers.split(",")}
    cutoffs = [float(x) for x in args.cutoffs.split(",")]
    last_piece = (args.length - 1) // args.chunk * args.chunk
    rows: list[dict] = []
    attend = prefill.SparsePrefill.attend

    def measured(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts=()):
        if q_start == last_piece and layer in only:
            rows.extend(measure(self, layer, segments, estimate_segments, keys, q_start, dense, cutoffs, args.repeat))
            print(json.dumps(rows[-1 - len(cutoffs) - 1:]), flush=True)
        return attend(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts)

    prefill.SparsePrefill.attend = measured
    llm = LLM(args.model, max_model_len=args.length + 64, max_num_seqs=1, dca=True, sparse=True,
              sparse_threshold=1024, sparse_mass=0.95, max_num_batched_tokens=args.chunk, num_threads=args.threads)
    llm.generate(document_ids(llm.tokenizer, args.length), SamplingParams(temperature=0.0, max_tokens=1))
    print("\n".join(table(rows)))
    name = os.path.basename(args.model).removesuffix(".gguf")
    with open(args.out, "w") as f:
        json.dump({"model": name, "length": args.length, "chunk": args.chunk, "threads": args.threads,
                   "repeat": args.repeat, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
