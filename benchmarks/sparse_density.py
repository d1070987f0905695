"""How much of the causal attention a vertical-slash plan computes, by tile height and mass cut-off.

One prefill of a passkey prompt (depth 50 %) with DCA and sparse prefill on; every chunk is computed densely
(max density ~0), so nothing but the plans depends on the settings measured. For each piece of each layer the
pattern is estimated at every --masses value and planned at every --blocks tile height (with the default span
merging, and for the smallest tile also without it), and the planned density (the share of causal pairs the
kernel would compute, own blocks included) is recorded. Prints the mean over layers per piece and writes JSON.

It separates the two reasons a plan is dense: the tile (a slash costs a whole tile of keys per query block)
and the budgets themselves (1000 verticals + 6096 slashes are a large share of a 32-64K history).

  python benchmarks/sparse_density.py --model M.gguf --length 32768 --masses none,0.99,0.95,0.9
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megactx.sparse.prefill as prefill  # noqa: E402
from megactx import LLM  # noqa: E402
from megactx.eval.backends import InProcessBackend  # noqa: E402
from megactx.eval.fitting import largest_fitting  # noqa: E402
from megactx.eval.passkey import build_prompt, make_key  # noqa: E402
from megactx.sparse.plan import MERGE_GAP, plan_density, vertical_slash_plan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def record_plans(masses: list[float | None], blocks: list[int], rows: list) -> None:
    """Wrap the estimator: estimate at every mass, plan at every tile, record densities; return the first."""
    estimate, plan_piece = prefill.estimate_vertical_slash, prefill.SparsePrefill.plan
    piece = {}

    def planned(self, layer, segments, estimate_segments, keys, q_start, n, dca_parts):
        piece.update(q_start=q_start, n=n)  # the rows being planned: the estimator only sees the keys
        return plan_piece(self, layer, segments, estimate_segments, keys, q_start, n, dca_parts)

    def wrapped(segments, k, q_pos, scale, verticals, slashes, mass, heads=None):
        q_start, n = piece["q_start"], piece["n"]
        m = k.shape[1]
        first = None
        for ms in masses:
            vs = estimate(segments, k, q_pos, scale, verticals, slashes, ms, heads)
            first = first if first is not None else vs
            for block in blocks:
                for gap in ([MERGE_GAP, 0] if block == min(blocks) else [MERGE_GAP]):
                    plan = vertical_slash_plan(vs, q_start, n, block, gap)
                    rows.append({"keys": m, "mass": ms, "block": block, "merge_gap": gap,
                                 "density": plan_density(plan, q_start, n, block)})
        return first

    prefill.estimate_vertical_slash = wrapped
    prefill.SparsePrefill.plan = planned


def density_table(rows: list[dict]) -> list[str]:
    """Markdown rows: one per setting (mass, tile, merging), one column per piece (its last key)."""
    pieces = sorted({r["keys"] for r in rows})
    density = {(r["mass"], r["block"], r["merge_gap"], r["keys"]): r["density"] for r in rows}
    out = ["| mass cut-off | tile rows | span merging | " + " | ".join(f"piece to {p}" for p in pieces) + " |",
           "|---|---:|---|" + "---:|" * len(pieces)]
    for ms, b, g in dict.fromkeys((r["mass"], r["block"], r["merge_gap"]) for r in rows):
        cells = [density.get((ms, b, g, p)) for p in pieces]
        out.append(f"| {ms or 'none'} | {b} | {'yes' if g else 'no'} | "
                   + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--masses", default="none,0.99,0.95,0.9")
    ap.add_argument("--blocks", default="64,128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    masses = [None if x == "none" else float(x) for x in args.masses.split(",")]
    blocks = sorted(int(x) for x in args.blocks.split(","))
    rows: list[dict] = []
    record_plans(masses, blocks, rows)
    llm = LLM(args.model, max_model_len=args.length + 64, max_num_seqs=1, dca=True, sparse=True,
              sparse_threshold=1024, sparse_max_density=1e-9, max_num_batched_tokens=args.chunk,
              num_threads=args.threads)
    backend = InProcessBackend(llm)
    key = make_key(0, args.length, 50, 0)
    n = largest_fitting(lambda k: backend.count(build_prompt(k, 50, key)), args.length)
    ids = backend.render(build_prompt(n, 50, key))
    backend.generate(ids, 1)
    table = defaultdict(list)
    for r in rows:
        table[(r["keys"], r["mass"], r["block"], r["merge_gap"])].append(r["density"])
    summary = [{"keys": k, "mass": ms, "block": b, "merge_gap": g, "density": round(sum(v) / len(v), 4)}
               for (k, ms, b, g), v in sorted(table.items(), key=lambda x: (str(x[0][1]), x[0][2], -x[0][3], x[0][0]))]
    print("\n".join(density_table(summary)))
    name = os.path.basename(args.model or "smollm2").removesuffix(".gguf")
    out = args.out or os.path.join(HERE, "results", f"sparse_density_{name}.json")
    with open(out, "w") as f:
        json.dump({"model": name, "length": args.length, "prompt_tokens": len(ids), "chunk": args.chunk, "rows": summary},
                  f, indent=1)


if __name__ == "__main__":
    main()
