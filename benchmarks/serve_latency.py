"""Server throughput and latency, side by side in one run (issue: OpenAI-compatible server).

Starts `megactx serve` on a free loopback port, then runs `megactx bench serve`:
  1. one stream at a time (8 requests), 2. eight concurrent streams (16 requests): aggregate decode tokens/s,
  3. one stream while another client's long prompt is being prefilled: its inter-token latency.
Writes benchmarks/results/serve_<model>.json and prints a table.

usage: python benchmarks/serve_latency.py [--model PATH] [--long-prompt-tokens 7000] [--max-num-batched-tokens 512]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(base: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "megactx.commands", "bench", "serve", "--base-url", base, "--json", *extra],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--long-prompt-tokens", type=int, default=7000)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--weight-dtype", default="auto")
    ap.add_argument("--packed-weights", default="auto")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megactx.commands", "serve", "--port", str(port), "--max-num-seqs", "16",
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--threads", "2",
           "--weight-dtype", args.weight_dtype, "--packed-weights", args.packed_weights]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        mt = str(args.max_tokens)
        single = bench(base, "--concurrency", "1", "--requests", "4", "--max-tokens", mt)
        eight = bench(base, "--concurrency", "8", "--requests", "16", "--max-tokens", mt)
        during = bench(base, "--concurrency", "1", "--requests", "1", "--max-tokens", "128",
                       "--long-prompt-tokens", str(args.long_prompt_tokens))
        alone = bench(base, "--concurrency", "1", "--requests", "1", "--max-tokens", "128")
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = {"single_stream": single, "eight_streams": eight, "during_long_prefill": during, "alone": alone,
            "max_num_batched_tokens": args.max_num_batched_tokens, "weight_dtype": args.weight_dtype,
            "packed_weights": args.packed_weights}
    name = os.path.basename(args.model or "smollm2").removesuffix(".gguf") + args.tag
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"serve_{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"output tokens/s (wall), 1 stream : {single['output_tok_s']:7.1f}")
    print(f"output tokens/s (wall), 8 streams: {eight['output_tok_s']:7.1f}  ({eight['output_tok_s'] / single['output_tok_s']:.2f}x)")
    print(f"aggregate decode rate,  1 stream : {single['decode_tok_s']:7.1f} tok/s")
    print(f"aggregate decode rate,  8 streams: {eight['decode_tok_s']:7.1f} tok/s  ({eight['decode_tok_s'] / single['decode_tok_s']:.2f}x)")
    print(f"inter-token latency alone          p50 {alone['itl_ms']['50']:6.1f} ms  p99 {alone['itl_ms']['99']:6.1f} ms")
    print(f"inter-token latency during prefill p50 {during['itl_ms']['50']:6.1f} ms  p99 {during['itl_ms']['99']:6.1f} ms"
          f"  (long prompt {args.long_prompt_tokens} tokens, TTFT {during.get('long_prompt_ttft_s', float('nan')):.1f} s)")
    print(f"time to first token of a request arriving during that prefill: {during['ttft_s']['50']:.2f} s "
          f"(alone {alone['ttft_s']['50']:.2f} s)")


if __name__ == "__main__":
    main()
