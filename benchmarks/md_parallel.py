"""BENCHMARKS.md and STUDIES.md parts for benchmarks/tensor_parallel.py: what tensor and context parallelism cost
here, and what they would exchange between machines."""
from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KINDS = ("tensor", "context", "context_sparse")  # results/KIND_parallel.json


def _load(kind: str = "tensor") -> dict | None:
    path = os.path.join(RESULTS, f"{kind}_parallel.json")
    return json.load(open(path)) if os.path.exists(path) else None


def sizing_table() -> list[str]:
    """On paper: bytes a rank sends per prefill chunk and per decode step, and the time on 10 and 100 Gb/s."""
    t = _load()
    if t is None:
        return []
    c = _load("context")
    out = ["## Sizing a cluster (on paper)", "",
           f"Two ranks, bf16 activations, {t['latency_assumed_s'] * 1e6:.0f} us assumed a collective. Tensor: ring "
           f"all-reduce (each rank sends 2 (N-1)/N of the payload), two a layer plus the embedding's. Context: the "
           f"queries' and the fp32 partial outputs' all-gathers a layer, the hidden states' once a step. The "
           f"context's length enters neither. A 1M-token prompt is 256 chunks. Context parallelism with sparse "
           f"prefill adds one all-reduce a layer of the 64-key groups' means, which does grow with the context: at "
           f"1M tokens 8.4 MB a layer (0.2 GB a chunk) for the 0.5B model, 34 MB (0.94 GB) for the 7B one.", "",
           "| split | model | per | bytes a rank sends | 10 Gb/s | 100 Gb/s | a 1M-token prompt |",
           "|---|---|---|---:|---:|---:|---:|"]
    for kind, r in [("tensor", r) for r in t["on_paper"]] + [("context", r) for r in (c or {}).get("on_paper", [])]:
        whole = f"{r['whole_prompt_1M_bytes'] / 1e9:.0f} GB, {256 * r['10 Gb/s'] / 60:.0f} min on 10 Gb/s" \
            if "whole_prompt_1M_bytes" in r else ""
        tokens = f"{r['tokens']} token{'s' if r['tokens'] > 1 else ''}"
        out.append(f"| {kind} | {r['model']} | {r['per']} ({tokens}) | {r['bytes_sent_per_rank'] / 1e6:.2f} MB | "
                   f"{1000 * r['10 Gb/s']:.1f} ms | {1000 * r['100 Gb/s']:.1f} ms | {whole} |")
    return out + [""]


def parallel_section() -> list[str]:
    """STUDIES.md: the measured runs, 2 ranks against 1 process on the same cores."""
    out = []
    for kind in KINDS:
        t = _load(kind)
        if t is None:
            continue
        probe = "TensorParallel.stats" if kind == "tensor" else "ContextParallel.stats"
        sparse = t.get("sparse", False)
        title = "Context parallelism with sparse prefill" if sparse else f"{t['kind'].capitalize()} parallelism"
        prefill = "sparse prefill of every prompt (threshold 0, pooled estimate)" if sparse else "dense prefill"
        out += [f"## {title} on one machine", "",
                f"`python benchmarks/tensor_parallel.py --model EVAL --kind {t['kind']}{' --sparse' if sparse else ''}`"
                f" ({t['cpu']}, fp32, 4K-token prefill chunks, {prefill}): one process with 2 threads against 2 ranks "
                "(gloo) of 1 thread each, "
                f"alternating, the same random prompt. Time in collectives is rank 0's ({probe}), waiting for the "
                "other rank included.", "",
                "| prompt | processes x threads | TTFT s | decode ms/token | collectives, ms a prefill chunk | "
                "ms a decode step | payload MB a chunk |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in t["measured"]:
            out.append(f"| {r['length']} | {r['ranks']} x {r['threads_per_rank']} | {r['ttft_s']} | "
                       f"{r['decode_ms_per_token']} | {r['comm_ms_per_prefill_chunk']} | "
                       f"{r['comm_ms_per_decode_step']} | {r['payload_mb_per_prefill_chunk']} |")
        out.append("")
    return out
