"""Which queries should estimate a prefill piece's pattern: its last 64 (MInference) or 64 spread over the piece.

One prefill of the perplexity document (the standard library's source) with DCA and sparse prefill on, no
longer than the model's DCA chunk (so one key segment). At the last piece of every layer, before the engine
goes on, the pattern is estimated from each query set at each mass cut-off (default budgets), planned as the
engine plans it, computed by the sparse kernel, and compared with the dense attention of the same rows:
planned density, recall exp(lse_sparse - lse_dense) (mean, and over the first and last quarter of the rows:
the spread queries are meant to serve the rows far from the last ones), and the relative error of the output.
Nothing here is timed.

  python benchmarks/sparse_estimate_queries.py --model M.gguf --length 30720 --masses 0.9,0.95
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megactx.sparse.prefill as prefill  # noqa: E402
from megactx import LLM, SamplingParams  # noqa: E402
from megactx.eval.ppl import document_ids  # noqa: E402
from megactx.sparse.kernel import sparse_attention  # noqa: E402
from megactx.sparse.plan import plan_density  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
QUERY_SETS = ("last", "spread")


def query_rows(kind: str, n: int, r: int) -> torch.Tensor:
    """Rows of an n-row piece that estimate: the last r, or r evenly spaced from the first to the last."""
    return torch.arange(n - r, n) if kind == "last" else torch.linspace(0, n - 1, r).round().long()


def compare(sp: prefill.SparsePrefill, layer: int, segments, keys, q_start: int, dense, masses) -> list[dict]:
    (lo, hi, q), = segments  # one key segment: the prompt fits in one DCA chunk
    n, m, cfg = q.shape[0], q_start + q.shape[0], sp.cfg
    out_dense, lse_dense = dense()
    rows, quarter = [], n // 4
    for kind in QUERY_SETS:
        idx = query_rows(kind, n, min(cfg.last_q, n))
        for mass in masses:
            sp.cfg = dataclasses.replace(cfg, mass=mass)  # the engine's plan, at this cut-off
            plan = sp.plan(layer, segments, [(lo, hi, q[idx])], keys, q_start, n, (), q_pos=idx + q_start)
            sp.cfg = cfg
            out, lse = sparse_attention(segments, keys, plan, q_start, cfg.block_size, sp.scale)
            recall = (lse - lse_dense).exp()  # [n, H]
            error = ((out - out_dense).float().norm(dim=-1) / out_dense.float().norm(dim=-1)).mean()
            rows.append({"layer": layer, "queries": kind, "mass": mass, "keys": m, "rows": n,
                         "density": round(plan_density(plan, q_start, n, cfg.block_size), 4),
                         "recall": round(float(recall.mean()), 4),
                         "recall_first_quarter": round(float(recall[:quarter].mean()), 4),
                         "recall_last_quarter": round(float(recall[-quarter:].mean()), 4),
                         "output_error": round(float(error), 4)})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["queries"], r["mass"])].append(r)
    names = ("density", "recall", "recall_first_quarter", "recall_last_quarter", "output_error")
    return [{"queries": kind, "mass": mass, "layers": len(rs),
             **{name: round(sum(r[name] for r in rs) / len(rs), 4) for name in names}}
            for (kind, mass), rs in groups.items()]


def table(rows: list[dict]) -> list[str]:
    out = ["| estimating queries | mass cut-off | mean density | mean recall | recall, first quarter of rows "
           "| recall, last quarter | relative output error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {'last 64' if r['queries'] == 'last' else '64 spread over the piece'} | {r['mass']} | "
                   f"{r['density']:.3f} | {r['recall']:.4f} | {r['recall_first_quarter']:.4f} | "
                   f"{r['recall_last_quarter']:.4f} | {r['output_error']:.4f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=30720, help="prompt tokens, at most the model's DCA chunk")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--masses", default="0.9,0.95")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse_estimate_queries.json"))
    args = ap.parse_args()
    masses = [float(x) for x in args.masses.split(",")]
    last_piece = (args.length - 1) // args.chunk * args.chunk
    rows: list[dict] = []
    attend = prefill.SparsePrefill.attend

    def measured(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts=()):
        if q_start == last_piece:
            if len(segments) != 1:
                sys.exit(f"--length {args.length} spans two DCA chunks: use at most the model's chunk length")
            rows.extend(compare(self, layer, segments, keys, q_start, dense, masses))
        return attend(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts)

    prefill.SparsePrefill.attend = measured
    llm = LLM(args.model, max_model_len=args.length + 64, max_num_seqs=1, dca=True, sparse=True,
              sparse_threshold=1024, sparse_mass=max(masses), max_num_batched_tokens=args.chunk,
              num_threads=args.threads)
    ids = document_ids(llm.tokenizer, args.length)
    llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=1))
    result = summary(rows)
    print("\n".join(table(result)))
    name = os.path.basename(args.model).removesuffix(".gguf")
    with open(args.out, "w") as f:
        json.dump({"model": name, "length": args.length, "chunk": args.chunk, "summary": result, "layers": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
