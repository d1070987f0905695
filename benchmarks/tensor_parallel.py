"""Tensor parallelism on one machine, and what it would exchange across machines.

Measured, side by side in one run: one process with T threads against --tensor-parallel-size 2 with T/2 threads a
rank, on the same random prompts (4,096 and 32,000 tokens by default): time to first token, decode time per token, and
rank 0's time inside the collectives (TensorParallel.stats, the documented probe: all-reduces and the logits'
all-gather, waiting for the slower rank included) per prefill chunk and per decode step.

On paper: the bytes each rank sends per prefill chunk and per decode step (two all-reduces of [tokens, hidden] a
layer, ring all-reduce: 2 (N - 1) / N of the payload, plus the embedding's), for the evaluation model and a 7B
model, and the time that implies on 10 and 100 Gb/s links. None of it depends on the context's length: with
tensor parallelism attention stays inside each rank (its heads), so a 1M-token prompt exchanges 256 chunks' worth.

  python benchmarks/tensor_parallel.py --model EVAL.gguf [--lengths 4096,32768] [--threads 2]
      [--out benchmarks/results/tensor_parallel.json]
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


def run(model: str, length: int, threads: int, tp: int) -> dict:
    engine = LLMEngine(EngineConfig.from_kwargs(model, dtype="fp32", num_threads=threads, tensor_parallel_size=tp,
                                                max_model_len=length + DECODE_TOKENS + 16, max_num_seqs=1,
                                                max_num_batched_tokens=CHUNK))
    try:
        ids = torch.randint(100, 20000, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0.0, ignore_eos=True))
        stats = engine.tp.stats
        start, first, marks = time.perf_counter(), None, []
        while engine.has_unfinished():
            engine.step()
            if first is None and engine.stats["prompt_tokens_computed"] >= length:
                first = time.perf_counter()
                marks.append(dict(stats))
        end = time.perf_counter()
        prefill_comm, total_comm = marks[0]["seconds"], stats["seconds"]
        chunks = -(-length // CHUNK)
        return {"length": length, "tensor_parallel": tp, "threads_per_rank": threads, "ttft_s": round(first - start, 2),
                "decode_ms_per_token": round(1000 * (end - first) / DECODE_TOKENS, 1),
                "comm_ms_per_prefill_chunk": round(1000 * prefill_comm / chunks, 1),
                "comm_ms_per_decode_step": round(1000 * (total_comm - prefill_comm) / DECODE_TOKENS, 2),
                "payload_mb_per_prefill_chunk": round(marks[0]["bytes"] / chunks / 1e6, 1)}
    finally:
        engine.close()


def on_paper(ranks: int = 2, context: int = 1 << 20) -> list[dict]:
    rows = []
    for name, (hidden, layers) in MODELS.items():
        for what, tokens in (("prefill chunk", CHUNK), ("decode step", 1)):
            collectives = 2 * layers + 1
            payload = collectives * tokens * hidden * 2  # bf16 activations
            sent = payload * 2 * (ranks - 1) / ranks
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
    ap.add_argument("--lengths", default="4096,32000")  # 32000 + the answer fits the 32K context
    ap.add_argument("--threads", type=int, default=2, help="threads of the one process; each of 2 ranks gets half")
    ap.add_argument("--out", default="benchmarks/results/tensor_parallel.json")
    args = ap.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for tp in (1, 2):
            rows.append(run(args.model, length, args.threads if tp == 1 else max(1, args.threads // 2), tp))
            print(json.dumps(rows[-1]), flush=True)
    paper = on_paper()
    print(f"\nCPU: {cpu_summary()}; fp32; prefill chunks of {CHUNK} tokens")
    print("| prompt | processes x threads | TTFT s | decode ms/token | in collectives, ms per chunk | per decode step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['tensor_parallel']} x {r['threads_per_rank']} | {r['ttft_s']} | "
              f"{r['decode_ms_per_token']} | {r['comm_ms_per_prefill_chunk']} | {r['comm_ms_per_decode_step']} |")
    print(f"\nOn paper, 2 ranks, bf16 activations, {LATENCY_S * 1e6:.0f} us a collective:")
    print("| model | per | bytes sent per rank | 10 Gb/s | 100 Gb/s | a 1M-token prompt |")
    print("|---|---|---|---|---|---|")
    for r in paper:
        whole = f"{r['whole_prompt_1M_bytes'] / 1e9:.0f} GB" if "whole_prompt_1M_bytes" in r else ""
        print(f"| {r['model']} | {r['per']} | {r['bytes_sent_per_rank'] / 1e6:.2f} MB | {1000 * r['10 Gb/s']:.1f} ms | "
              f"{1000 * r['100 Gb/s']:.1f} ms | {whole} |")
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu_summary(), "measured": rows, "on_paper": paper, "latency_assumed_s": LATENCY_S}, f,
                  indent=1)


if __name__ == "__main__":
    main()
