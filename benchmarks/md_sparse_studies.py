"""BENCHMARKS.md's studies of how sparse the attention is and what the kernel costs (md_sparse.py places them)."""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# the study scripts' settings (the scripts are removed; their results and these tables stay)
GRANULARITIES = ("per row", "256 x 1", "256 x 64", "64 x 64")
TARGETS = (0.9, 0.95, 0.97, 0.99)
BLOCK_ESTIMATES = ("exact", "sampled", "pooled")


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


def estimate_queries_table(rows: list[dict]) -> list[str]:
    out = ["| estimating queries | mass cut-off | mean density | mean recall | recall, first quarter of rows "
           "| recall, last quarter | relative output error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {'last 64' if r['queries'] == 'last' else '64 spread over the piece'} | {r['mass']} | "
                   f"{r['density']:.3f} | {r['recall']:.4f} | {r['recall_first_quarter']:.4f} | "
                   f"{r['recall_last_quarter']:.4f} | {r['output_error']:.4f} |")
    return out


def oracle_tables(s: dict) -> list[str]:
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


def block_plans_table(rows: list[dict]) -> list[str]:
    dense = {r["layer"]: r["kernel_s"] for r in rows if r["plan"] == "dense"}
    out = ["| layer | plan | density | recall | estimate + plan s | kernel s | (estimate + kernel) / dense |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['plan']} | {r['density']:.3f} | {r['recall']:.4f} | {r['estimate_s']:.2f} | "
                   f"{r['kernel_s']:.2f} | {(r['estimate_s'] + r['kernel_s']) / dense[r['layer']]:.2f} |")
    return out



def sparse_density_section() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "sparse_density_*.json"))):
        d = json.load(open(path))
        out += [f"### Planned density by tile and mass cut-off ({d['model']}, {d['prompt_tokens']}-token passkey prompt)",
                "", f"`python benchmarks/sparse_density.py --length {d['length']}`: the plans the estimates of one "
                "prefill give at each setting (share of causal pairs computed, mean over layers), per prefill piece "
                "(its last key). Default budgets; the engine's tile is 256 rows with span merging.", "",
                ] + density_table(d["rows"])
        out.append("")
    return out


def estimate_queries_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_estimate_queries.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    first = d["layers"][0]
    return [f"### Which queries estimate the pattern ({d['model']})", "",
            f"`python benchmarks/sparse_estimate_queries.py --model EVAL --length {d['length']}`: one prefill of "
            f"the perplexity document in {d['chunk']}-token chunks; at the last piece ({first['rows']} rows, "
            f"{first['keys']} keys) of each of the {d['summary'][0]['layers']} layers the pattern is "
            "estimated from the piece's last 64 queries (the engine) or from 64 spread evenly over it, planned, "
            "computed and compared with the dense attention of the same rows (default budgets; means over "
            "layers). The relative output error is |o_sparse - o_dense| / |o_dense| per row and head.", ""
            ] + estimate_queries_table(d["summary"]) + [
            "", "Spread queries plan more pairs and lose less: at mass 0.9 they compute more than the last 64 "
            "at 0.95 for less error, so neither set is both sparser and more accurate at these cut-offs, and "
            "the engine keeps MInference's last queries. In this 6144-row piece the rows far from the last queries "
            "(the first quarter) keep the recall of the nearest ones.", ""]


def oracle_section() -> list[str]:
    out = []
    for name in sorted(f for f in os.listdir(os.path.join(HERE, "results")) if f.startswith("sparse_oracle_")):
        d = json.load(open(os.path.join(HERE, "results", name)))
        first = d["layers"][0]
        ids = [r["layer"] for r in d["layers"]]
        some = ids != list(range(len(ids)))  # measured on the layers given by --layers
        out += [f"### How sparse the attention is: the engine's plans against an oracle ({d['model']}, "
                f"{d['length']} tokens)", "",
                f"`python benchmarks/sparse_oracle.py --model EVAL --length {d['length']}"
                + (f" --layers {','.join(map(str, ids))}" if some else "") + "`: one prefill of the "
                f"perplexity document in {d['chunk']}-token chunks; at the piece of rows "
                f"{first['keys'] - first['rows']}-{first['keys']} of each of {'these' if some else 'the'} {len(ids)} layers the exact attention "
                "probabilities give the fewest (query, key) pairs that keep a mean recall (the attention mass the "
                "computed keys carry, mean over rows and heads), greedy over the layer, at four granularities: "
                "each row its own keys (64 rows sampled), each 256-row block its own keys, 256-row blocks of "
                "64-key groups, 64-row blocks of 64-key groups. The engine's plan (its last 64 queries, default "
                "budgets) is computed by the sparse kernel at each mass cut-off, and the oracle's density is read "
                "at the recall the engine reached, layer by layer (means over layers). The last table: block "
                "estimates at 256-row blocks of 64-key groups, each head and block keeping its best groups until a "
                "cut-off of their estimated mass ('exact': the true masses, the best such a cut-off can do; "
                "'sampled': the true masses of every 16th row; 'pooled': every row scored against each group's "
                "mean key), their density read at the engine's recall (where even their lowest cut-off, 0.8, keeps "
                "more, the density there: an upper bound), over the layers where every estimate reaches it.", ""] + oracle_tables(d["summary"]) + [""]
        e = next((e for e in d["summary"]["engine"] if e["mass"] == 0.95), None)
        if e:
            share = {g: e["oracle"][g] / e["density"] for g in e["oracle"]}
            out += [f"At the recall the engine keeps with mass 0.95 ({e['recall']:.3f}), an oracle computes "
                    f"{share['256 x 64']:.2f} of its pairs in 256-row blocks of 64-key groups, {share['256 x 1']:.2f} "
                    f"with any keys per 256-row block and {share['per row']:.2f} with any keys per row: the attention "
                    "is sparse per row, but the keys a row needs are scattered and differ from row to row, so "
                    "the columns and diagonals the last queries see cover them only in part.", ""]
    return out


def block_plans_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_block_plans.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    layers = ",".join(str(x) for x in sorted({r["layer"] for r in d["rows"]}))
    return [f"### Pooled block plans in the kernel ({d['model']}, {d['length']} tokens)", "",
            f"`python benchmarks/sparse_block_plans.py --model EVAL --length {d['length']} --layers {layers}`: "
            f"the same prefill as above; at the last piece of each layer the dense attention, the engine's "
            "estimate and plan (mass 0.95) and the pooled block plan at three cut-offs, each plan computed by the "
            f"sparse kernel, best of {d['repeat']}, {d['threads']} threads, side by side in one process.", ""
            ] + block_plans_table(d["rows"]) + [""]


def sparse_kernel_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_kernel.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    out = ["### The kernel's calls on synthetic plans", "",
           f"`python benchmarks/sparse_kernel.py`: one {d['rows_per_piece']}-row prefill piece at {d['keys']} keys "
           "(14 heads, 2 KV heads, dim 64, 256-row blocks), per head the 100 nearest diagonals, slash bands, single "
           "scattered slashes and 1000 verticals; the same plan computed each way, alternating, best of "
           f"{d['repeat']}, {d['threads']} threads. 'per span' is one flash call per span (the kernel before); "
           "'gathered' gathers spans under 2048 keys with the columns into one call per block; 'tiled' computes "
           "the part of a span four consecutive blocks share once for their 1024 rows; 'exact diagonals' is "
           "tiled + gathered on the plan `--sparse-exact-diagonals` makes, where an isolated slash is one key per "
           "row instead of a 256-key span: a subset of the other plan, with its own density.", "",
           "| pattern | planned density | way | seconds | speedup vs dense | cost per computed pair vs dense |",
           "|---|---:|---|---:|---:|---:|"]
    out += [f"| {r['pattern']} | {r['density']:.3f} | {r['way']} | {r['seconds']:.2f} | {r['speedup_vs_dense']:.2f}x | "
            f"{r['cost_per_pair_vs_dense']:.2f} |" for r in d["rows"]]
    return out + [""]
