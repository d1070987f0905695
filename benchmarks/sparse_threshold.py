"""Below the sparse threshold nothing slows down (issue: sparse prefill): TTFT with sparse prefill on (its
default threshold, 32768 tokens) vs --no-sparse, for prompts shorter than the threshold.

Two engines in one process, measured alternately on the same token ids, best of --repeat (the machine is shared).
Prints a table and writes JSON.

usage: python benchmarks/sparse_threshold.py [--model PATH] [--lengths 2048,8000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    ap.add_argument("--lengths", default="2048,8000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse_threshold.json"))
    args = ap.parse_args()
    from megactx import LLM, SamplingParams
    lengths = [int(x) for x in args.lengths.split(",")]
    engines = {name: LLM(args.model, max_model_len=max(lengths) + 8, max_num_seqs=1, num_threads=args.threads,
                         sparse=name == "sparse on") for name in ("sparse on", "sparse off")}
    threshold = engines["sparse on"].engine.sparse.threshold
    params = SamplingParams(temperature=0, max_tokens=1)
    rows = []
    for n in lengths:
        if n >= threshold:
            raise SystemExit(f"--lengths must stay below the sparse threshold ({threshold} tokens), got {n}")
        ids = [(i * 7919) % 40000 + 100 for i in range(n)]
        best = {name: float("inf") for name in engines}
        for _ in range(args.repeat):
            for name, llm in engines.items():
                start = time.perf_counter()
                llm.generate(ids, params)
                best[name] = min(best[name], time.perf_counter() - start)
        on = engines["sparse on"].engine.runner.backend.sparse
        rows.append({"length": n, "ttft_sparse_on_s": round(best["sparse on"], 3),
                     "ttft_sparse_off_s": round(best["sparse off"], 3),
                     "ratio": round(best["sparse on"] / best["sparse off"], 3),
                     "sparse_chunks": sum(len(d) for d in on.stats.planned.values())})
    print(f"| length | TTFT sparse on s (threshold {threshold}) | TTFT --no-sparse s | on / off | sparse chunks |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['ttft_sparse_on_s']:.2f} | {r['ttft_sparse_off_s']:.2f} | {r['ratio']:.3f} | "
              f"{r['sparse_chunks']} |")
    with open(args.out, "w") as f:
        json.dump({"model": os.path.basename(args.model or "smollm2"), "threshold": threshold, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
