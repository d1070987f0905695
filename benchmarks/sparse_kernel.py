"""The sparse kernel's ways of calling the flash kernel, side by side on the same synthetic plans, against dense.

One prefill piece of the evaluation model's shape (14 heads, 2 KV heads, dim 64): the last --rows rows of a
--keys-key prompt, 256-row blocks. Per head a vertical-slash pattern: the 100 nearest diagonals, --bands
slash bands of random width (up to --band-width) at random offsets, --scattered single slashes, and 1000
verticals. Each way computes the same plan (the tests check that the results agree):

  per span           one flash call per planned span and one for the block's columns (the kernel before)
  gathered           spans narrower than 2048 keys gathered with the columns into one call per block
  tiled + gathered   also, the part of a span four consecutive blocks share computed once for their 1024 rows
  exact diagonals    tiled + gathered on the plan with --sparse-exact-diagonals: isolated slashes one key per
                     row instead of a 256-key span (a subset of the plan above: its own, lower density)
  dense              the flash kernel over every earlier key, plus the piece's own causal part

The ways run alternately, best of --repeat (the machine is shared). Prints a table and writes JSON.

usage: python benchmarks/sparse_kernel.py [--patterns scattered,banded] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megactx.attention.dense import attention  # noqa: E402
from megactx.attention.merge import merge_attention  # noqa: E402
from megactx.sparse.config import SparseConfig  # noqa: E402
from megactx.sparse.estimate import VerticalSlash  # noqa: E402
from megactx.sparse.kernel import KeySource, sparse_attention  # noqa: E402
from megactx.sparse.plan import plan_density, vertical_slash_plan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
H, HKV, D, BLOCK = 14, 2, 64, 256
PATTERNS = {  # name: (bands, widest band, scattered slashes)
    "scattered": (6, 2000, 60),
    "banded": (3, 8000, 30),
}
WAYS = {"per span": {"tile_blocks": 1, "min_view": 0}, "gathered": {"tile_blocks": 1}, "tiled + gathered": {}}


def synthetic_plan(m: int, q_start: int, n: int, bands: int, widest: int, scattered: int, seed: int = 0,
                   diagonal_cost: int = 0):
    g = torch.Generator().manual_seed(seed)
    slashes, verticals = [], []
    for _ in range(H):
        parts = [torch.arange(1, 101)]
        for _ in range(bands):
            w = int(torch.randint(300, widest, (1,), generator=g))
            o = int(torch.randint(200, m - w, (1,), generator=g))
            parts.append(torch.arange(o, o + w))
        parts.append(torch.randint(101, m, (scattered,), generator=g))
        slashes.append(torch.unique(torch.cat(parts)))
        verticals.append(torch.randperm(m, generator=g)[:1000].sort().values)
    width = max(len(s) for s in slashes)
    slashes = torch.stack([torch.cat([s, s[-1:].expand(width - len(s))]) for s in slashes])
    return vertical_slash_plan(VerticalSlash(torch.stack(verticals), slashes), q_start, n, BLOCK,
                               diagonal_cost=diagonal_cost)


def dense(q, k, v, q_start, scale):
    earlier = attention(q, k[:, :q_start], v[:, :q_start], scale, causal=False)
    own = attention(q, k[:, q_start:], v[:, q_start:], scale, causal=True)
    return merge_attention([earlier[0], own[0]], [earlier[1], own[1]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--keys", type=int, default=65536)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse_kernel.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, n = args.keys, args.rows
    q_start, scale = m - n, D ** -0.5
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(HKV, m, D, generator=g), torch.randn(HKV, m, D, generator=g)
    keys = KeySource(k, v, slice(0, m), torch.float32)
    rows = []
    for name in args.patterns.split(","):
        plan = synthetic_plan(m, q_start, n, *PATTERNS[name])
        density = plan_density(plan, q_start, n, BLOCK)
        ways = {way: (lambda kw=kw: sparse_attention([(0, m, q)], keys, plan, q_start, BLOCK, scale, **kw))
                for way, kw in WAYS.items()}
        exact = synthetic_plan(m, q_start, n, *PATTERNS[name], diagonal_cost=SparseConfig(exact_diagonals=True).diagonal_cost)
        ways["exact diagonals"] = lambda: sparse_attention([(0, m, q)], keys, exact, q_start, BLOCK, scale)
        ways["dense"] = lambda: dense(q, k, v, q_start, scale)
        densities = {"exact diagonals": plan_density(exact, q_start, n, BLOCK), "dense": 1.0}
        best = {way: float("inf") for way in ways}
        outs = {}
        for _ in range(args.repeat):
            for way, run in ways.items():
                t0 = time.perf_counter()
                outs[way] = run()
                best[way] = min(best[way], time.perf_counter() - t0)
        agree = max(float((outs[w][0] - outs["per span"][0]).abs().max()) for w in WAYS)
        for way, s in best.items():
            dens = densities.get(way, density)
            rows.append({"pattern": name, "density": round(dens, 3), "way": way,
                         "seconds": round(s, 3), "speedup_vs_dense": round(best["dense"] / s, 2),
                         "cost_per_pair_vs_dense": round(s / best["dense"] / dens, 2),
                         "max_diff_vs_per_span": agree})
    print(f"| pattern | density | way | seconds | vs dense | cost per pair vs dense |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pattern']} | {r['density']} | {r['way']} | {r['seconds']:.2f} | {r['speedup_vs_dense']:.2f}x | "
              f"{r['cost_per_pair_vs_dense']:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"keys": m, "rows_per_piece": n, "threads": args.threads, "repeat": args.repeat, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
