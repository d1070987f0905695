"""BENCHMARKS.md part for the million-token run: whole prompts retrieved at 256K and 1M (each run on its own machine,
its CPU named), and the attention's growth with the context measured in one run on one machine
(benchmarks/sparse_chunk_cost.py: one layer, one chunk at each depth, summed over a prompt)."""
from __future__ import annotations

import json
import os

from megactx.eval.results import read_rows

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# passkey folders of the long runs: whole prompts computed from nothing
LONG_RUNS = ("passkey_eval_dca_sparse_linear_bf16", "passkey_eval_dca_sparse_linear_bf16_1m")


def long_runs() -> list[str]:
    out = []
    for folder in LONG_RUNS:
        path = os.path.join(RESULTS, folder)
        rows = read_rows(os.path.join(path, "passkey.jsonl"))
        if not rows:
            continue
        run = json.load(open(os.path.join(path, "run.json")))
        whole = rows[0]["ttft_s"]  # the first depth computes its whole prompt; later ones may reuse a prefix
        correct = sum(r["correct"] for r in rows)
        out.append(f"| {rows[0]['length'] // 1024}K | {correct}/{len(rows)} | {whole / 60:.0f} min | "
                   f"{rows[0]['prompt_tokens'] / whole:.0f} | {run['peak_rss_gb']} GB | {run['dtype']} | "
                   f"{run['settings']} | {run['cpu']} |")
    if not out:
        return []
    return ["| length | passkey depths correct | TTFT, whole prompt | tokens/s | peak RSS | dtype | settings | CPU |",
            "|---:|---:|---:|---:|---:|---|---|---|"] + out


def attention_growth() -> list[str]:
    path = os.path.join(RESULTS, "sparse_chunk_cost.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    rows = d["rows"]
    out = [f"`python benchmarks/sparse_chunk_cost.py --model EVAL`: {d['scope']}; compute {d['compute_dtype']}, "
           f"{d['kv_dtype']} cache, `--sparse-max-keys {d['max_keys']} --sparse-coarse-refine {d['coarse_refine']}`, "
           f"{d['chunk']}-token chunks. CPU: {d['cpu']}. A prompt's attention sums its chunks' (per-chunk seconds "
           "interpolated between the measured depths); dense DCA's per-chunk cost is linear in the keys. The estimate of a chunk "
           "comes right after the chunk before it and adds only its own keys' group sums to those kept for the "
           "sequence; re-reading: the same chunk summing every key's group again (before they were kept).", "",
           "| context | a chunk: estimate s | estimate re-reading every key s | kernel s | density | a prompt's "
           "attention, one layer | x the first | dense DCA, one layer |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dense = r.get("prompt_dense_s")
        dense = "-" if dense is None else f"{dense:.0f} s" + (" (extrapolated)" if r.get("dense_extrapolated") else "")
        reread = r.get("estimate_rereading_s")
        out.append(f"| {r['keys'] // 1024}K | {r['estimate_s']:.2f} | {'-' if reread is None else f'{reread:.2f}'} | "
                   f"{r['kernel_s']:.2f} | {r['density']:.4f} | "
                   f"{r['prompt_sparse_s']:.0f} s | {r['sparse_growth']:.2f}x | {dense} |")
    by_keys = {r["keys"]: r["prompt_sparse_s"] for r in rows}
    if 2**18 in by_keys and 2**20 in by_keys:
        out += ["", f"From 256K to 1M tokens (4x): **{by_keys[2**20] / by_keys[2**18]:.2f}x** the attention (the target: "
                    "at most 4.5x). Repeated runs of this benchmark here differed by up to 15 %."]
    return out


def scaling_section() -> list[str]:
    runs, growth = long_runs(), attention_growth()
    if not runs and not growth:
        return []
    out = ["## The million-token run", ""]
    if runs:
        out += ["Whole prompts, `megactx eval passkey --dca --dtype bf16 --lengths L` with the settings shown. The rows "
                "ran on different machines: compare within a row, not across.", ""] + runs + [""]
    if growth:
        out += ["How the attention grows with the context, one run on one machine.", ""] + growth + [""]
    return out
