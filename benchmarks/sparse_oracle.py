"""How sparse could a prefill piece's attention be at all: the engine's plans against an oracle that sees it.

One prefill of the perplexity document with DCA and sparse prefill on (mass 0.95 for the pieces before the last).
At the piece that starts at the last multiple of the chunk (the last piece, unless a DCA chunk boundary cuts it
first) of every layer, before the engine goes on, the exact attention probabilities of all its rows are
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
and the oracle's density is read at that same recall.

Block estimates, at 256-row blocks of 64-key groups, each (head, block) keeping its best groups until their
estimated mass reaches a cut-off (its own keys and the first group always): "exact" (the block's true group
masses: the best a per-block cut-off can do), "sampled" (the true masses of every 16th row of the block: what
an estimate from 16 queries a block would see) and "pooled" (every row scored against each group's mean key,
softmax over the groups: costs 1/64 of the dense scores). Their density is read at the engine's recall too.

Nothing here is timed (sparse_block_plans.py times the kernel on pooled plans): the ratio of the densities says
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
BLOCK_ESTIMATES = ("exact", "sampled", "pooled")
SAMPLE_EVERY = 16  # rows of a block that the "sampled" estimate sees
CUTOFFS = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


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


def group_means(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [Hkv, m, D] -> each 64-key group's mean key [Hkv, groups, D] and its size [groups]."""
    m = k.shape[1]
    size = (m - torch.arange(0, m, 64)).clamp(max=64).float()
    return group_sum(k.float().transpose(1, 2), 64).transpose(1, 2) / size[None, :, None], size


def pooled_scores(segments, means: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """The "pooled" estimate of rows at pos: each 64-key group scored by its mean key (plus log of its size), scored
    with the queries of the segment its first key is in, softmax over the causal groups -> [H, rows, groups]."""
    hkv, ng, _ = means.shape
    h = segments[0][2].shape[1]
    logits = torch.full((h, len(pos), ng), float("-inf"))
    for lo, hi, q in segments:
        g0, g1 = -(-lo // 64), -(-hi // 64)
        for j in range(hkv):
            heads = slice(j * (h // hkv), (j + 1) * (h // hkv))
            logits[heads, :, g0:g1] = q[:, heads].float().transpose(0, 1) @ means[j, g0:g1].t() * scale
    logits += size.log()
    logits.masked_fill_(torch.arange(ng)[None, None, :] * 64 > pos[None, :, None], float("-inf"))
    return logits.softmax(-1)


def oracle_items(segments, k, q_start: int, n: int, scale: float) -> tuple[dict[str, Items], dict]:
    """The exact probabilities of the piece's n rows, 64 rows at a time, reduced to each granularity's items; and
    the block estimates' group scores at 256 x 64 with what choosing among them costs and keeps."""
    m = q_start + n
    h = segments[0][2].shape[1]
    sampled = set(torch.linspace(0, n - 1, min(SAMPLED_ROWS, n)).round().long().tolist())
    col256, fine, rows, row_pos, sample_fine, pooled_fine = [], [], [], [], [], []
    buffer = torch.empty(h, FINE, m)
    means, size = group_means(k)
    for a in range(0, n, FINE):
        b = min(a + FINE, n)
        pos = torch.arange(q_start + a, q_start + b)
        probs = attention_probs([(lo, hi, q[a:b]) for lo, hi, q in segments], k, pos, scale,
                                out=buffer if b - a == FINE else None)  # [H, rows, m]
        if a % 256 == 0:
            col256.append(torch.zeros(h, m))
        col256[-1] += probs.sum(1)
        groups = group_sum(probs, 64)  # [H, rows, groups]
        fine.append((groups.sum(1), causal_pairs(pos, m, 64)))
        every = (pos - q_start) % SAMPLE_EVERY == SAMPLE_EVERY - 1
        sample_fine.append(groups[:, every].sum(1))
        pooled_fine.append(pooled_scores([(lo, hi, q[a:b]) for lo, hi, q in segments], means, size, pos, scale).sum(1))
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
    to256 = lambda x: torch.nn.functional.pad(x, (0, 0, 0, pad)).view(h, (b64 + pad) // 4, 4, -1).sum(2)  # noqa: E731
    mass256g = to256(fine_mass)
    cost256g = torch.nn.functional.pad(fine_cost, (0, 0, 0, pad)).view((b64 + pad) // 4, 4, -1).sum(1)
    forced = torch.zeros(cost256g.shape, dtype=torch.bool)  # [B, groups]: own keys and the first group
    for i, a in enumerate(range(q_start, m, 256)):
        forced[i, a // 64:-(-min(a + 256, m) // 64)] = True
    forced[:, 0] = True
    estimates = {"exact": mass256g, "sampled": to256(torch.stack(sample_fine, 1)),
                 "pooled": to256(torch.stack(pooled_fine, 1))}
    row_probs = torch.stack(rows, 1)  # [H, S, m]
    row_cost = (torch.arange(m)[None, :] <= torch.tensor(row_pos)[:, None]).float()  # [S, m]
    return {
        "per row": Items(row_probs.flatten(), row_cost.expand(h, -1, -1).flatten(), h * len(rows)),
        "256 x 1": Items(mass256.flatten(), cost256.expand(h, -1, -1).flatten().float(), h * n),
        "256 x 64": Items(mass256g.flatten(), cost256g.expand(h, -1, -1).flatten().float(), h * n),
        "64 x 64": Items(fine_mass.flatten(), fine_cost.expand(h, -1, -1).flatten().float(), h * n),
    }, {"scores": estimates, "mass": mass256g, "cost": cost256g.float(), "forced": forced}


def block_cut(score: torch.Tensor, cutoff: float, forced: torch.Tensor) -> torch.Tensor:
    """score [H, B, G] estimated group masses -> chosen [H, B, G]: per (head, block) the best groups while the
    estimated mass before them is below cutoff of the block's, plus the forced ones [B, G]."""
    s = score.masked_fill(forced[None], 0)
    best = s.sort(-1, descending=True)
    keep = best.values.cumsum(-1) - best.values < cutoff * s.sum(-1, keepdim=True)
    return torch.zeros_like(s, dtype=torch.bool).scatter(-1, best.indices, keep) | forced[None]


def block_estimate_curves(blocks: dict, causal: float, rows: int) -> dict[str, list[tuple[float, float, float]]]:
    """Each estimate's (cut-off, density, recall) as the cut-off rises."""
    out = {}
    for name, score in blocks["scores"].items():
        out[name] = []
        for cutoff in CUTOFFS:
            chosen = block_cut(score, cutoff, blocks["forced"])
            out[name].append((cutoff, round(float((chosen * blocks["cost"][None]).sum()) / causal, 4),
                              round(float((chosen * blocks["mass"]).sum()) / rows, 4)))
    return out


def density_at(curve, recall: float) -> float | None:
    # linear between the measured cut-offs; None when even the highest cut-off does not reach the recall
    for (_, d0, r0), (_, d1, r1) in zip(curve, curve[1:]):
        if r0 <= recall <= r1:
            return round(d0 + (d1 - d0) * (recall - r0) / (r1 - r0) if r1 > r0 else d0, 4)
    return round(curve[0][1], 4) if recall < curve[0][2] else None


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
    items, blocks = oracle_items(segments, keys.span(0, m)[0], q_start, n, sp.scale)
    curves = block_estimate_curves(blocks, causal, h * n)
    row = {"layer": layer, "keys": m, "rows": n, "engine": [], "oracle": {}, "block_estimates": curves}
    for name in GRANULARITIES:
        curve = items[name].curve()
        # per row: the pairs of the sampled rows against their own causal pairs
        whole = float(items[name].cost.sum()) if name == "per row" else causal
        row["oracle"][name] = {str(t): round(items[name].pairs_at(curve, t) / whole, 4) for t in TARGETS}
        for p in plans:
            p.setdefault("oracle", {})[name] = round(items[name].pairs_at(curve, p["recall"]) / whole, 4)
    for p in plans:
        p["block_estimates"] = {name: density_at(c, p["recall"]) for name, c in curves.items()}
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
        # the block estimates: over the layers where each reaches the engine's recall at its highest cut-off
        reached = [r for r in layers if all(v is not None for v in r["engine"][i]["block_estimates"].values())]
        out["engine"][-1]["block_estimates"] = {
            "layers": len(reached), "engine_density": mean([r["engine"][i]["density"] for r in reached] or [0]),
            **{name: mean([r["engine"][i]["block_estimates"][name] for r in reached] or [0])
               for name in BLOCK_ESTIMATES}}
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
    out += ["", "| engine's mass cut-off | layers | engine density | " +
            " | ".join(f"block estimate '{name}'" for name in BLOCK_ESTIMATES) + " |",
            "|---|---:|---:|" + "---:|" * len(BLOCK_ESTIMATES)]
    for e in s["engine"]:
        b = e.get("block_estimates")
        if b and b["layers"]:
            out.append(f"| {e['mass'] if e['mass'] is not None else 'none (budgets)'} | {b['layers']} | "
                       f"{b['engine_density']:.3f} | " + " | ".join(f"{b[n]:.3f}" for n in BLOCK_ESTIMATES) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--length", type=int, default=30720, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (--max-num-batched-tokens)")
    ap.add_argument("--masses", default="0.9,0.95,none", help="the engine's cut-offs to compare ('none': budgets)")
    ap.add_argument("--threshold", type=int, default=1024, help="sparse threshold (the pieces before the last)")
    ap.add_argument("--layers", default=None, help="measure only these layers (comma-separated; default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: results/sparse_oracle_LENGTH.json")
    args = ap.parse_args()
    masses = [None if x == "none" else float(x) for x in args.masses.split(",")]
    last_piece = (args.length - 1) // args.chunk * args.chunk
    only = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    layers: list[dict] = []
    attend = prefill.SparsePrefill.attend

    def measured(self, layer, segments, estimate_segments, keys, q_start, dense, dca_parts=()):
        if q_start == last_piece and (only is None or layer in only):
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
