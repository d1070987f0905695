"""Tensor or context parallelism on one machine, and what it would exchange across machines.

Measured, side by side in one run: one process with T threads against 2 ranks (--tensor-parallel-size 2, or with
--kind context --context-parallel-size 2) of T/2 threads each, on the same random prompts (4,096 and 32,000 tokens
by default, dense prefill): time to first token, decode time per token, and rank 0's time inside the collectives
(TensorParallel.stats or ContextParallel.stats, the documented probes: waiting for the slower rank included) per
prefill chunk and per decode step.

On paper: the bytes each rank sends per prefill chunk and per decode step (two all-reduces of [tokens, hidden] a
layer, ring all-reduce: 2 (N - 1) / N of the payload, plus the embedding's), for the evaluation model and a 7B
model, and the time that implies on 10 and 100 Gb/s links. None of it depends on the context's length: with
tensor parallelism attention stays inside each rank (its heads), so a 1M-token prompt exchanges 256 chunks' worth.
Context parallelism, per layer of a step: the queries' all-gather (compute dtype) and the partial outputs' with
their log-sum-exp (fp32, every row from every rank), plus the hidden states' once a step; also independent of the
context's length, which is what lets it split a 1M-token cache.

With --sparse (context parallelism), every prompt is prefilled sparsely (threshold 0, the pooled estimate):
each rank plans from the key groups' means the ranks share by one all-reduce a layer and piece, whose size grows
with the context (1/64 of the keys' bytes), and computes the planned keys it holds.

  python benchmarks/tensor_parallel.py --model EVAL.gguf [--kind tensor|context] [--lengths 4096,32000]
      [--threads 2] [--sparse] [--out benchmarks/results/KIND[_sparse]_parallel.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megactx.config import EngineConfig  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.engine.llm_engine import LLMEngine  # noqa: E402
from megactx.sampling import SamplingParams  # noqa: E402

CHUNK = 4096
DECODE_TOKENS = 32
# name -> hidden size, layers (Qwen2.5-Coder-0.5B, the evaluation model; Qwen2.5-7B)
MODELS = {"Qwen2.5 0.5B": (896, 24), "Qwen2.5 7B": (3584, 28)}
LINKS = {"10 Gb/s": 10e9 / 8, "100 Gb/s": 100e9 / 8}
LATENCY_S = 50e-6  # per collective on a LAN (an assumption, stated in the table)


# per layer, 0.5B and 7B: attention heads, head dim
HEADS = {"Qwen2.5 0.5B": (14, 64), "Qwen2.5 7B": (28, 128)}


def run(model: str, length: int, threads: int, ranks: int, kind: str, sparse: bool = False) -> dict:
    size = {"tensor_parallel_size": ranks} if kind == "tensor" else {"context_parallel_size": ranks}
    prefill = {"sparse": True, "sparse_threshold": 0, "sparse_estimate": "pooled"} if sparse else {"sparse": False}
    engine = LLMEngine(EngineConfig.from_kwargs(model, dtype="fp32", num_threads=threads, **prefill, **size,
                                                max_model_len=length + DECODE_TOKENS + 16, max_num_seqs=1,
                                                max_num_batched_tokens=CHUNK))
    try:
        ids = torch.randint(100, 20000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0.0, ignore_eos=True))
        stats = (engine.tp.stats if kind == "tensor" or engine.cp is None else engine.cp.stats)
        start, first, marks = time.perf_counter(), None, []
        while engine.has_unfinished():
            engine.step()
            if first is None and engine.stats["prompt_tokens_computed"] >= length:
                first = time.perf_counter()
                marks.append(dict(stats))
        end = time.perf_counter()
        prefill_comm, total_comm = marks[0]["seconds"], stats["seconds"]
        chunks = -(-length // CHUNK)
        return {"length": length, "kind": kind, "sparse": sparse, "ranks": ranks, "threads_per_rank": threads, "ttft_s": round(first - start, 2),
                "decode_ms_per_token": round(1000 * (end - first) / DECODE_TOKENS, 1),
                "comm_ms_per_prefill_chunk": round(1000 * prefill_comm / chunks, 1),
                "comm_ms_per_decode_step": round(1000 * (total_comm - prefill_comm) / DECODE_TOKENS, 2),
                "payload_mb_per_prefill_chunk": round(marks[0]["bytes"] / chunks / 1e6, 1)}
    finally:
        engine.close()


def sent_per_rank(kind: str, name: str, tokens: int, ranks: int) -> tuple[float, int]:
    """Bytes one rank sends in a step of `tokens` rows, and the number of collectives, in bf16 compute."""
    hidden, layers = MODELS[name]
    if kind == "tensor":  # two ring all-reduces a layer and the embedding's: each sends 2 (N - 1) / N of it
        collectives = 2 * layers + 1
        return collectives * tokens * hidden * 2 * 2 * (ranks - 1) / ranks, collectives
    heads, dim = HEADS[name]  # ring all-gathers: a rank sends its part to N - 1 others
    queries = tokens * heads * dim * 2 * (ranks - 1) / ranks  # each rank its own rows
    partials = tokens * heads * (dim + 1) * 4 * (ranks - 1)  # each rank every row's partial
    return layers * (queries + partials) + tokens * hidden * 2 * (ranks - 1) / ranks, 2 * layers + 1


def on_paper(kind: str, ranks: int = 2, context: int = 1 << 20) -> list[dict]:
    rows = []
    for name in MODELS:
        for what, tokens in (("prefill chunk", CHUNK), ("decode step", 1)):
            sent, collectives = sent_per_rank(kind, name, tokens, ranks)
            row = {"model": name, "per": what, "tokens": tokens, "bytes_sent_per_rank": int(sent)}
            for link, rate in LINKS.items():
                row[link] = sent / rate + collectives * LATENCY_S
            if what == "prefill chunk":
                row["whole_prompt_1M_bytes"] = int(sent * context / CHUNK)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kind", choices=("tensor", "context"), default="tensor")
    ap.add_argument("--lengths", default="4096,32000")  # 32000 + the answer fits the 32K context
    ap.add_argument("--threads", type=int, default=2, help="threads of the one process; each of 2 ranks gets half")
    ap.add_argument("--sparse", action="store_true", help="sparse prefill of every prompt (context parallelism)")
    ap.add_argument("--out", help="default: benchmarks/results/KIND[_sparse]_parallel.json")
    args = ap.parse_args()
    if args.sparse and args.kind != "context":
        ap.error("--sparse measures context parallelism: add --kind context")
    out = args.out or f"benchmarks/results/{args.kind}{'_sparse' if args.sparse else ''}_parallel.json"
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for ranks in (1, 2):
            rows.append(run(args.model, length, args.threads if ranks == 1 else max(1, args.threads // 2), ranks,
                            args.kind, args.sparse))
            print(json.dumps(rows[-1]), flush=True)
    paper = on_paper(args.kind)
    print(f"\nCPU: {cpu_summary()}; fp32; {args.kind} parallel; prefill chunks of {CHUNK} tokens; "
          f"{'sparse' if args.sparse else 'dense'} prefill")
    print("| prompt | processes x threads | TTFT s | decode ms/token | in collectives, ms per chunk | per decode step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['ranks']} x {r['threads_per_rank']} | {r['ttft_s']} | "
              f"{r['decode_ms_per_token']} | {r['comm_ms_per_prefill_chunk']} | {r['comm_ms_per_decode_step']} |")
    print(f"\nOn paper, 2 ranks, bf16 activations, {LATENCY_S * 1e6:.0f} us a collective:")
    print("| model | per | bytes sent per rank | 10 Gb/s | 100 Gb/s | a 1M-token prompt |")
    print("|---|---|---|---|---|---|")
    for r in paper:
        whole = f"{r['whole_prompt_1M_bytes'] / 1e9:.0f} GB" if "whole_prompt_1M_bytes" in r else ""
        print(f"| {r['model']} | {r['per']} | {r['bytes_sent_per_rank'] / 1e6:.2f} MB | {1000 * r['10 Gb/s']:.1f} ms | "
              f"{1000 * r['100 Gb/s']:.1f} ms | {whole} |")
    with open(out, "w") as f:
        json.dump({"cpu": cpu_summary(), "kind": args.kind, "sparse": args.sparse, "measured": rows, "on_paper": paper, "latency_assumed_s": LATENCY_S}, f,
                  indent=1)


if __name__ == "__main__":
    main()
