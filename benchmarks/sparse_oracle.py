"""How sparse could a prefill piece's attention be at all: the engine's plans against an oracle that sees it.

One prefill of the perplexity document with DCA and sparse prefill on (mass 0.95 for the pieces before the last).
At the last piece of every layer, before the engine goes on, the exact attention probabilities of all its rows are
computed, and from them the fewest (query, key) pairs that keep a given mean recall (the attention mass the
computed keys carry, mean over rows and heads: what exp(lse_sparse - lse_dense) measures), at the granularity a
kernel computes:

  per row      each row its own keys (rows sampled evenly): the least any top-k selection can compute
  256 x 1      each 256-row block its own set of keys, shared by its rows (the engine's kernel's blocks)
  256 x 64     ... in groups of 64 consecutive keys
  64 x 64      64-row blocks of 64-key groups (MInference's GPU kernels)

The oracle is greedy over the layer (all heads and blocks), most mass per computed pair first, so a layer reaches
the recall with the fewest pairs, spending more where a head's attention is diffuse. The engine's own plan at each
mass cut-off (its last 64 queries, default budgets) is computed by the sparse kernel for its density and recall,
and the oracle's density is read at that same recall. Nothing here is timed: the ratio of the two densities says
how much an estimate could gain; the oracle's density bounds the speed-up of any kernel that costs what the dense
one does per pair.

  python benchmarks/sparse_oracle.py --model M.gguf --length 30720 --masses 0.9,0.95
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megactx.sparse.prefill as prefill  # noqa: E402
from megactx import LLM, SamplingParams  # noqa: E402
from megactx.eval.ppl import document_ids  # noqa: E402
from megactx.sparse.estimate import attention_probs  # noqa: E402
from megactx.sparse.kernel import sparse_attention  # noqa: E402
from megactx.sparse.plan import plan_density  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FINE = 64  # rows per pass, and the finest block of the oracle's granularities
GRANULARITIES = ("per row", "256 x 1", "256 x 64", "64 x 64")
TARGETS = (0.9, 0.95, 0.97, 0.99)
SAMPLED_ROWS = 64


@dataclasses.dataclass
class Items:
    """Candidate (block, key group) items of one granularity: the attention mass each carries (summed over its
    rows), the causal pairs it costs, and the mass all rows carry (rows x heads: every row's softmax sums to 1)."""
    mass: torch.Tensor
    cost: torch.Tensor
    total: float

    def curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        # greedy: most mass per pair first -> cumulative (share of the mass, pairs)
        keep = self.cost > 0
        mass, cost = self.mass[keep].double(), self.cost[keep].double()
        order = torch.argsort(mass / cost, descending=True)
        return mass[order].cumsum(0) / self.total, cost[order].cumsum(0)

    def pairs_at(self, curve, recall: float) -> float:
        share, pairs = curve
        i = min(int(torch.searchsorted(share, torch.tensor([recall], dtype=share.dtype))), len(pairs) - 1)
        return float(pairs[i])


def causal_pairs(pos: torch.Tensor, m: int, group: int) -> torch.Tensor:
    """pos: [rows] query positions -> [ceil(m / group)] causal pairs each key group makes with these rows."""
    starts = torch.arange(0, m, group)
    width = (m - starts).clamp(max=group)
    return (pos[:, None] + 1 - starts[None, :]).clamp(min=0).minimum(width[None, :]).sum(0)


def group_sum(x: torch.Tensor, group: int) -> torch.Tensor:
    # [..., m] -> [..., ceil(m / group)]: sums over consecutive keys
    m = x.shape[-1]
    pad = -m % group
    return torch.nn.functional.pad(x, (0, pad)).view(*x.shape[:-1], (m + pad) // group, group).sum(-1)


def oracle_items(segments, k, q_start: int, n: int, scale: float) -> dict[str, Items]:
    """The exact probabilities of the piece's n rows, 64 rows at a time, reduced to each granularity's items."""
    m = q_start + n
    h = segments[0][2].shape[1]
    sampled = set(torch.linspace(0, n - 1, min(SAMPLED_ROWS, n)).round().long().tolist())
    col256, fine, rows, row_pos = [], [], [], []
    buffer = torch.empty(h, FINE, m)
    for a in range(0, n, FINE):
        b = min(a + FINE, n)
        pos = torch.arange(q_start + a, q_start + b)
        probs = attention_probs([(lo, hi, q[a:b]) for lo, hi, q in segments], k, pos, scale,
                                out=buffer if b - a == FINE else None)  # [H, rows, m]
        if a % 256 == 0:
            col256.append(torch.zeros(h, m))
        col256[-1] += probs.sum(1)
        fine.append((group_sum(probs.sum(1), 64), causal_pairs(pos, m, 64)))
        for i in sorted(sampled.intersection(range(a, b))):
            rows.append(probs[:, i - a].clone())
            row_pos.append(q_start + i)
    blocks256 = [torch.arange(q_start + a, min(q_start + a + 256, m)) for a in range(0, n, 256)]
    cost256 = torch.stack([causal_pairs(p, m, 1) for p in blocks256])  # [B, m]
    mass256 = torch.stack(col256, 1)  # [H, B, m]
    fine_mass = torch.stack([f[0] for f in fine], 1)  # [H, B64, G]
    fine_cost = torch.stack([f[1] for f in fine])  # [B64, G]
    b64 = fine_mass.shape[1]
    pad = -b64 % 4  # 64-row blocks -> 256-row blocks (the last one may be short)
    mass256g = torch.nn.functional.pad(fine_mass, (0, 0, 0, pad)).view(h, (b64 + pad) // 4, 4, -1).sum(2)
    cost256g = torch.nn.functional.pad(fine_cost, (0, 0, 0, pad)).view((b64 + pad) // 4, 4, -1).sum(1)
    row_probs = torch.stack(rows, 1)  # [H, S, m]
    row_cost = (torch.arange(m)[None, :] <= torch.tensor(row_pos)[:, None]).float()  # [S, m]
    return {
        "per row": Items(row_probs.flatten(), row_cost.expand(h, -1, -1).flatten(), h * len(rows)),
        "256 x 1": Items(mass256.flatten(), cost256.expand(h, -1, -1).flatten().float(), h * n),
        "256 x 64": Items(mass256g.flatten(), cost256g.expand(h, -1, -1).flatten().float(), h * n),
        "64 x 64": Items(fine_mass.flatten(), fine_cost.expand(h, -1, -1).flatten().float(), h * n),
    }


def engine_plans(sp: prefill.SparsePrefill, layer: int, segments, estimate_segments, keys, q_start: int, n: int,
                 dense_lse: torch.Tensor, masses) -> list[dict]:
    """The engine's plan at each mass cut-off (None: the budgets alone): its density and mean recall."""
    cfg, out = sp.cfg, []
    for mass in masses:
        sp.cfg = dataclasses.replace(cfg, mass=mass)
        plan = sp.plan(layer, segments, estimate_segments, keys, q_start, n, ())
        sp.cfg = cfg
        _, lse = sparse_attention(segments, keys, plan, q_start, cfg.block_size, sp.scale)
        out.append({"mass": mass, "density": plan_density(plan, q_start, n, cfg.block_size),
                    "recall": float((lse - dense_lse).exp().mean())})
    return out


def measure_layer(sp, layer, segments, estimate_segments, keys, q_start, dense, masses) -> dict:
    n = segments[0][2].shape[0]
    m = q_start + n
    h = segments[0][2].shape[1]
    causal = h * (n * q_start + n * (n + 1) / 2)
    _, lse = dense()
    plans = engine_plans(sp, layer, segments, estimate_segments, keys, q_start, n, lse, masses)
    items = oracle_items(segments, keys.span(0, m)[0], q_start, n, sp.scale)
    row = {"layer": layer, "keys": m, "rows": n, "engine": [], "oracle": {}}
    for name in GRANULARITIES:
        curve = items[name].curve()
        # per row: the pairs of the sampled rows against their own causal pairs
        whole = float(items[name].cost.sum()) if name == "per row" else causal
        row["oracle"][name] = {str(t): round(items[name].pairs_at(curve, t) / whole, 4) for t in TARGETS}
        for p in plans:
            p.setdefault("oracle", {})[name] = round(items[name].pairs_at(curve, p["recall"]) / whole, 4)
    row["engine"] = [{**p, "density": round(p["density"], 4), "recall": round(p["recall"], 4)} for p in plans]
    return row


def summary(layers: list[dict], masses) -> dict:
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    out = {"layers": len(layers), "oracle": {g: {str(t): mean([r["oracle"][g][str(t)] for r in layers])
                                                for t in TARGETS} for g in GRANULARITIES}, "engine": []}
    for i, mass in enumerate(masses):
        out["engine"].append({"mass": mass, "density": mean([r["engine"][i]["density"] for r in layers]),
                              "recall": mean([r["engine"][i]["recall"] for r in layers]),
                              "oracle": {g: mean([r["engine"][i]["oracle"][g] for r in layers])
                                         for g in GRANULARITIES}})
    return out


def tables(s: dict) -> list[str]:
    out = ["| engine's mass cut-off | engine density | engine recall | " +
           " | ".join(f"oracle density, {g}" for g in GRANULARITIES) + " |",
           "|---|---:|---:|" + "---:|" * len(GRANULARITIES)]
    for e in s["engine"]:
        out.append(f"| {e['mass'] if e['mass'] is not None else 'none (budgets)'} | {e['density']:.3f} | "
                   f"{e['recall']:.4f} | " + " | ".join(f"{e['oracle'][g]:.3f}" for g in GRANULARITIES) + " |")
    out += ["", "| mean recall | " + " | ".join(f"oracle density, {g}" for g in GRANULARITIES) + " |",
            "|---:|" + "---:|" * len(GRANULARITIES)]
    for t in TARGETS:
        out.append(f"| {t} | " + " | ".join(f"{s['oracle'][g][str(t)]:.3f}" for g in GRANULARITIES) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=30720, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--masses", default="0.9,0.95,none", help="the engine's cut-offs to compare ('none': budgets)")
    ap.add_argument("--threshold", type=int, default=1024, help="sparse threshold (the pieces before the last)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: results/sparse_oracle_LENGTH.json")
    args = ap.parse_args()
    masses = [None if x == "none" else float(x) for x in args.masses.split(",")]
    last_piece = (args.length - 1) // args.chunk * args.chunk
    layers: list[dict] = []
    attend = prefill.SparsePrefill.attend

    def measured(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts=()):
        if q_start == last_piece:
            layers.append(measure_layer(self, layer, segments, estimate_segments, keys, q_start, dense, masses))
            print(json.dumps(layers[-1]), flush=True)
        return attend(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts)

    prefill.SparsePrefill.attend = measured
    llm = LLM(args.model, max_model_len=args.length + 64, max_num_seqs=1, dca=True, sparse=True,
              sparse_threshold=args.threshold, sparse_mass=0.95, max_num_batched_tokens=args.chunk,
              num_threads=args.threads)
    ids = document_ids(llm.tokenizer, args.length)
    llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=1))
    result = summary(layers, masses)
    print("\n".join(tables(result)))
    name = os.path.basename(args.model).removesuffix(".gguf")
    out = args.out or os.path.join(HERE, "results", f"sparse_oracle_{args.length}.json")
    with open(out, "w") as f:
        json.dump({"model": name, "length": args.length, "chunk": args.chunk, "summary": result, "layers": layers},
                  f, indent=1)


if __name__ == "__main__":
    main()
