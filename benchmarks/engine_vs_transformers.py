"""Prefill and decode speed, this engine vs transformers, side by side in one run (issue: engine core).

Each engine runs in its own subprocess per model (so that peak RSS is that engine's own), with the same token
ids, 2 threads, fp32. Prefill: time to the first sampled token for a prompt of L tokens (transformers: one
forward with logits_to_keep=1). Decode: tokens/s of 32 greedy tokens after a 4K-token prompt (prefill time
subtracted). Prints a table and writes JSON.

usage: python benchmarks/engine_vs_transformers.py [--models smollm2,eval] [--lengths 1024,4096,16384]
       [--out benchmarks/results/engine_vs_transformers.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_MODEL = os.path.expanduser("~/.cache/megactx/models/qwen2.5-coder-0.5b-instruct.gguf")


def prompt_ids(length: int, vocab: int = 40000) -> list[int]:
    return [(i * 7919) % vocab + 100 for i in range(length)]


def run_megactx(model: str, lengths: list[int], decode_ctx: int, decode_n: int, chunk: int) -> dict:
    from megactx import LLM, SamplingParams
    llm = LLM(model, max_num_batched_tokens=chunk, max_model_len=max(lengths + [decode_ctx]) + decode_n + 8,
              num_threads=2)
    llm.generate([prompt_ids(64)], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    rows = {}
    for n in lengths:
        t = time.perf_counter()
        llm.generate([prompt_ids(n)], SamplingParams(temperature=0, max_tokens=1))
        rows[n] = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([prompt_ids(decode_ctx)], SamplingParams(temperature=0, max_tokens=1))
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate([prompt_ids(decode_ctx)], SamplingParams(temperature=0, max_tokens=decode_n + 1, ignore_eos=True))
    decode = time.perf_counter() - t - prefill
    return {"prefill_s": rows, "decode_tok_s": decode_n / decode}


def run_transformers(model: str, lengths: list[int], decode_ctx: int, decode_n: int, chunk: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    folder, name = os.path.split(model)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa")
    m.eval()
    rows = {}
    with torch.no_grad():
        m(torch.tensor([prompt_ids(64)]), logits_to_keep=1)
        for n in lengths:
            t = time.perf_counter()
            m(torch.tensor([prompt_ids(n)]), logits_to_keep=1)
            rows[n] = time.perf_counter() - t
        ids = torch.tensor([prompt_ids(decode_ctx)])
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=decode_n + 1, min_new_tokens=decode_n + 1, do_sample=False)
        decode = time.perf_counter() - t - prefill
    return {"prefill_s": rows, "decode_tok_s": decode_n / decode}


def child(args) -> None:
    fn = run_megactx if args.engine == "megactx" else run_transformers
    res = fn(args.model, [int(x) for x in args.lengths.split(",")], args.decode_ctx, args.decode_n, args.chunk)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,eval")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--decode-ctx", type=int, default=4096)
    ap.add_argument("--decode-n", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4096, help="megactx max_num_batched_tokens")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "engine_vs_transformers.json"))
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        return child(args)
    from megactx.loader import default_model_path
    paths = {"smollm2": default_model_path(), "eval": EVAL_MODEL}
    results = []
    for name in args.models.split(","):
        path = paths.get(name, name)
        if not os.path.exists(path):
            print(f"skipping {name}: {path} not found (run ../shared/tools/fetch-eval-model)", file=sys.stderr)
            continue
        per_engine = {}
        for engine in ("megactx", "transformers"):
            cmd = [sys.executable, __file__, "--engine", engine, "--model", path, "--lengths", args.lengths,
                   "--decode-ctx", str(args.decode_ctx), "--decode-n", str(args.decode_n), "--chunk", str(args.chunk)]
            env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{engine} failed on {name}")
            per_engine[engine] = json.loads(line[7:])
        ours, ref = per_engine["megactx"], per_engine["transformers"]
        for n in args.lengths.split(","):
            a, b = ours["prefill_s"][n], ref["prefill_s"][n]
            results.append({"model": name, "metric": "prefill_tok_s", "length": int(n), "megactx": int(n) / a,
                            "transformers": int(n) / b, "ratio": b / a})
        results.append({"model": name, "metric": "decode_tok_s", "length": args.decode_ctx,
                        "megactx": ours["decode_tok_s"], "transformers": ref["decode_tok_s"],
                        "ratio": ours["decode_tok_s"] / ref["decode_tok_s"]})
        results.append({"model": name, "metric": "peak_rss_mb", "length": max(int(x) for x in args.lengths.split(",")),
                        "megactx": ours["peak_rss_mb"], "transformers": ref["peak_rss_mb"],
                        "ratio": ref["peak_rss_mb"] / ours["peak_rss_mb"]})
    print(f"{'model':8} {'metric':14} {'length':>7} {'megactx':>10} {'transformers':>13} {'ratio':>6}")
    for r in results:
        print(f"{r['model']:8} {r['metric']:14} {r['length']:>7} {r['megactx']:>10.1f} {r['transformers']:>13.1f} "
              f"{r['ratio']:>5.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": 2, "dtype": "fp32", "chunk": args.chunk, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
