"""Dual Chunk Attention costs what dense attention costs (issue: DCA, item 3).

Dense and DCA engines on the same model, loaded in one process and measured alternately on the same token ids
(the machine is shared): prefill time to the first token and decode tokens/s at each length. Dense beyond the
trained length runs plain RoPE (allow_long_context): its output is not the point, its cost is.
Prints a table and writes JSON.

usage: python benchmarks/dca_cost.py [--model PATH] [--lengths 16384,65536] [--decode-n 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--decode-n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from megactx import LLM, SamplingParams
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + args.decode_n + 8
    engines = {mode: LLM(args.model, max_model_len=max_len, max_num_seqs=1, num_threads=args.threads,
                         dca=mode == "dca", allow_long_context=mode == "dense") for mode in ("dense", "dca")}
    rows = []
    for n in lengths:
        ids = [(i * 7919) % 40000 + 100 for i in range(n)]
        for mode, llm in engines.items():
            stamps = []
            start = time.perf_counter()
            llm.generate(ids, SamplingParams(temperature=0, max_tokens=args.decode_n + 1, ignore_eos=True),
                         on_step=lambda outs: stamps.append(time.perf_counter()))
            # one on_step call per engine step: the last decode_n + 1 are the sampled tokens
            prefill = stamps[-args.decode_n - 1] - start
            decode = args.decode_n / (stamps[-1] - stamps[-args.decode_n - 1])
            rows.append({"mode": mode, "length": n, "prefill_s": round(prefill, 2), "decode_tok_s": round(decode, 2)})
            print(f"  {mode:5} {n:7}: prefill {prefill:8.1f} s, decode {decode:6.2f} tok/s", file=sys.stderr, flush=True)
    print("| length | dense prefill s | DCA prefill s | DCA / dense | dense decode tok/s | DCA decode tok/s | dense / DCA |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        d, c = (next(r for r in rows if r["mode"] == m and r["length"] == n) for m in ("dense", "dca"))
        print(f"| {n} | {d['prefill_s']:.1f} | {c['prefill_s']:.1f} | {c['prefill_s'] / d['prefill_s']:.2f}x | "
              f"{d['decode_tok_s']:.2f} | {c['decode_tok_s']:.2f} | {d['decode_tok_s'] / c['decode_tok_s']:.2f}x |")
    name = os.path.basename(args.model or "smollm2").removesuffix(".gguf")
    out = args.out or os.path.join(HERE, "results", f"dca_cost_{name}.json")
    with open(out, "w") as f:
        json.dump({"model": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
