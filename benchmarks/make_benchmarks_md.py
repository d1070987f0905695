"""Regenerate BENCHMARKS.md from benchmarks/results/*.json."""
from __future__ import annotations

import glob
import json
import os
import platform

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def engine_tables() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "engine_*.json"))):
        data = json.load(open(path))
        rows = data["rows"]
        if not rows:
            continue
        model = rows[0]["model"]
        out += [f"### {model}", "",
                "| engine | metric | length | megactx | transformers | ratio |", "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['engine']} | {r['metric']} | {r['length']} | {r['megactx']:.1f} | "
                       f"{r['transformers']:.1f} | {r['ratio']:.2f}x |")
        out.append("")
    return out


def serve_tables() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "serve_*.json"))):
        d = json.load(open(path))
        name = os.path.basename(path)[6:-5]
        s, e, dur, alone = d["single_stream"], d["eight_streams"], d["during_long_prefill"], d["alone"]
        out += [f"### server: {name} (max_num_batched_tokens {d['max_num_batched_tokens']})", "",
                "| run | output tok/s | TTFT p50 s | ITL p50 ms | ITL p99 ms |", "|---|---:|---:|---:|---:|"]
        for label, r in (("1 stream", s), ("8 concurrent streams", e), ("1 stream alone (128 tokens)", alone),
                         (f"1 stream during a {dur.get('long_prompt_tokens')}-token prefill", dur)):
            out.append(f"| {label} | {r['output_tok_s']:.1f} | {r['ttft_s']['50']:.2f} | {r['itl_ms']['50']:.1f} | "
                       f"{r['itl_ms']['99']:.1f} |")
        out += ["", f"Aggregate decode with 8 streams: {e['output_tok_s'] / s['output_tok_s']:.2f}x a single stream's.", ""]
    return out


def main() -> None:
    lines = ["# Benchmarks", "",
             f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU, shared and noisy: "
             "every ratio below comes from engines measured side by side in one run.", "",
             "## Engine vs transformers (prefill, decode, memory)", "",
             "`python benchmarks/engine_vs_transformers.py --models smollm2 --lengths 1024,4096,8000` and "
             "`--models eval --lengths 1024,4096,16384 --repeat 1 --rss-length 4096`. fp32 compute, 2 threads, "
             "transformers with sdpa attention loading the same GGUF file. `megactx` is the default "
             "(fp16 storage of the quantized GGUF weights); `megactx-fp32w` keeps fp32 weights like transformers. "
             "Prefill: tokens/s to the first token. Decode: tokens/s from the first generated token to the 33rd after a "
             "4K-token prompt; transformers through generate(), and through a bare forward loop. Ratio > 1 favours "
             "megactx (for memory: transformers' peak / megactx's).", ""]
    lines += engine_tables()
    lines += ["## Server", "", "`python benchmarks/serve_latency.py` (starts `megactx serve` on loopback and runs "
              "`megactx bench serve`).", ""]
    lines += serve_tables()
    lines += ["## Known gaps (measured above)", "",
              "- Quantized GGUF weights stored in fp16 (the default) are upcast for each prefill chunk: about 5% of "
              "prefill time at 1K-4K tokens on the 0.5B model; `--weight-dtype fp32` removes it and loses the 3.5x decode.",
              "- Server: a request that arrives while a long prompt is being prefilled waits for that prefill to end "
              "(TTFT 17.5 s behind a 6,000-token prompt); streams already running keep their pace (inter-token p50 "
              "12.7 ms vs 12.5 ms alone). Eight concurrent streams give 1.7x one stream's throughput: per-sequence "
              "attention calls and sampling dominate a batched decode step of this small model.", ""]
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
