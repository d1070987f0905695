"""Cost of the sparse prefill's estimate for one 4K-row prefill chunk at the end of a long context, one layer of the
evaluation model's shape (14 query heads, 2 KV heads, head dim 64): the pooled estimate (every 64-key group) against
the coarse-to-fine one (1,024-key super-groups, --sparse-coarse-refine N of them refined), side by side in one run.
Random keys and queries: the cost does not depend on the values.

Writes benchmarks/results/sparse_estimate_cost.json and prints a table.

usage: python benchmarks/sparse_estimate_cost.py [--lengths 65536,262144,1048576] [--refine 32]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from megactx.attention.sparse.coarse import coarse_to_fine_scores
from megactx.attention.sparse.pooled import pooled_scores
from megactx.config.hardware import cpu_summary

HERE = os.path.dirname(os.path.abspath(__file__))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="65536,262144,1048576")
    ap.add_argument("--refine", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'keys':>9}  {'pooled s':>9}  {'coarse s':>9}  ratio")
    for m in map(int, args.lengths.split(",")):
        q_start = m - args.chunk
        k, q = torch.randn(2, m, 64), torch.randn(args.chunk, 14, 64)
        segments = [(0, m, q)]
        flat = best_of(lambda: pooled_scores(segments, k, q_start, 256, 0.125), args.repeats)
        two_step = best_of(lambda: coarse_to_fine_scores(segments, k, q_start, 256, 0.125, args.refine), args.repeats)
        rows.append({"keys": m, "pooled_s": round(flat, 4), "coarse_s": round(two_step, 4),
                     "ratio": round(flat / two_step, 2)})
        print(f"{m:9d}  {flat:9.3f}  {two_step:9.3f}  {flat / two_step:.2f}x", flush=True)
    result = {"cpu": cpu_summary(), "threads": torch.get_num_threads(), "chunk": args.chunk, "refine": args.refine,
              "rows": rows}
    with open(os.path.join(HERE, "results", "sparse_estimate_cost.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
