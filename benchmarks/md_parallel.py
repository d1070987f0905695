"""BENCHMARKS.md and STUDIES.md parts for benchmarks/tensor_parallel.py: what tensor parallelism costs here, and
what it would exchange between machines."""
from __future__ import annotations

import json
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tensor_parallel.json")


def _load() -> dict | None:
    return json.load(open(PATH)) if os.path.exists(PATH) else None


def sizing_table() -> list[str]:
    """On paper: bytes a rank sends per prefill chunk and per decode step, and the time on 10 and 100 Gb/s."""
    t = _load()
    if t is None:
        return []
    out = ["## Sizing a cluster (tensor parallelism, on paper)", "",
           f"Two ranks, bf16 activations, ring all-reduce (each rank sends 2 (N-1)/N of the payload), two all-reduces "
           f"a layer plus the embedding's, {t['latency_assumed_s'] * 1e6:.0f} us assumed a collective. The context's "
           f"length does not enter: attention stays inside each rank's heads. A 1M-token prompt is 256 chunks.", "",
           "| model | per | bytes a rank sends | 10 Gb/s | 100 Gb/s | a 1M-token prompt |", "|---|---|---:|---:|---:|---:|"]
    for r in t["on_paper"]:
        whole = f"{r['whole_prompt_1M_bytes'] / 1e9:.0f} GB, {256 * r['10 Gb/s'] / 60:.0f} min on 10 Gb/s" \
            if "whole_prompt_1M_bytes" in r else ""
        tokens = f"{r['tokens']} token{'s' if r['tokens'] > 1 else ''}"
        out.append(f"| {r['model']} | {r['per']} ({tokens}) | {r['bytes_sent_per_rank'] / 1e6:.2f} MB | "
                   f"{1000 * r['10 Gb/s']:.1f} ms | {1000 * r['100 Gb/s']:.1f} ms | {whole} |")
    return out + [""]


def parallel_section() -> list[str]:
    """STUDIES.md: the measured run, 2 ranks against 1 process on the same cores."""
    t = _load()
    if t is None:
        return []
    out = ["## Tensor parallelism on one machine", "",
           f"`python benchmarks/tensor_parallel.py --model EVAL` ({t['cpu']}, fp32, 4K-token prefill chunks): one "
           "process with 2 threads against 2 ranks (gloo) of 1 thread each, alternating, the same random prompt. "
           "Time in collectives is rank 0's (TensorParallel.stats), waiting for the other rank included.", "",
           "| prompt | processes x threads | TTFT s | decode ms/token | collectives, ms a prefill chunk | "
           "ms a decode step | payload MB a chunk |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in t["measured"]:
        out.append(f"| {r['length']} | {r['tensor_parallel']} x {r['threads_per_rank']} | {r['ttft_s']} | "
                   f"{r['decode_ms_per_token']} | {r['comm_ms_per_prefill_chunk']} | {r['comm_ms_per_decode_step']} | "
                   f"{r['payload_mb_per_prefill_chunk']} |")
    return out + [""]
