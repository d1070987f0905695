"""Prefix caching, measured side by side in one run (issue: a second question without a second prefill).

  second   one long document (Python's standard library source, --length tokens), three questions about it, with
           --kv-cache-dir: the first computes the document, the second takes it from memory, the third is asked
           of a new engine (nothing in memory, the blocks read from disk: what a restart sees). TTFT of each.
  shared   --concurrent requests that share a --shared-tokens document, sent at once, with prefix caching on and
           off: wall time, the KV blocks in use at the peak, prompt tokens computed, and whether the greedy
           answers are the same.
  random   prompts that share nothing, prefix caching on and off in alternating rounds: the bookkeeping's cost.

Writes benchmarks/results/prefix_cache_<part>.json as each part finishes and prints a table.

usage: python benchmarks/prefix_cache.py --model EVAL.gguf --parts second,shared --length 65536 --dca
       python benchmarks/prefix_cache.py --parts random            (the bundled SmolLM2)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time

import torch

from megactx import LLM, SamplingParams
from megactx.eval.ppl import document_ids
from megactx.config.hardware import cpu_summary

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["\n\nWhich module of the text above defines the most classes?",
             "\n\nName three functions from the text above that open files.",
             "\n\nWhat does the first function in the text above return?"]


def ttft(out) -> float:
    return out.metrics["first_token_time"] - out.metrics["arrival"]


def save(part: str, result: dict) -> None:
    path = os.path.join(HERE, "results", f"prefix_cache_{part}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1), flush=True)


def second_question(args, common: dict) -> dict:
    probe = LLM(args.model, **common)
    doc = document_ids(probe.tokenizer, args.length)
    prompts = [doc + probe.tokenizer.encode(q, add_special_tokens=False) for q in QUESTIONS]
    del probe
    params = SamplingParams(temperature=0, max_tokens=8)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.cache_parent) as cache_dir:
        llm = LLM(args.model, kv_cache_dir=cache_dir, **common)
        for name, prompt in (("first question", prompts[0]), ("second question, same engine", prompts[1])):
            before = dict(llm.engine.stats)
            out = llm.generate(prompt, params)[0]
            rows.append(_row(name, out, llm.engine.stats, before))
        del llm
        gc.collect()
        llm = LLM(args.model, kv_cache_dir=cache_dir, **common)  # a restart: only the disk remembers
        out = llm.generate(prompts[2], params)[0]
        rows.append(_row("third question, new engine (disk)", out, llm.engine.stats, {}))
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
    first = rows[0]["ttft_s"]
    for r in rows:
        r["ttft_vs_first"] = round(r["ttft_s"] / first, 4)
    return {"length": len(doc), "disk_bytes": disk, "rows": rows}


def _row(name: str, out, stats: dict, before: dict) -> dict:
    delta = {k: stats[k] - before.get(k, 0) for k in stats}
    return {"case": name, "prompt_tokens": out.usage.prompt_tokens, "cached_tokens": out.usage.cached_tokens,
            "computed_tokens": delta["prompt_tokens_computed"], "ttft_s": round(ttft(out), 3),
            "blocks_written": delta["blocks_written"], "blocks_read": delta["blocks_read"],
            "disk_s": round(delta["disk_seconds"], 3), "answer": out.outputs[0].text}


def shared_prefix(args, common: dict) -> dict:
    results = {}
    for caching in (True, False):
        llm = LLM(args.model, prefix_caching=caching, max_num_seqs=args.concurrent,
                  kv_cache_memory=args.kv_cache_memory, **common)
        doc = document_ids(llm.tokenizer, args.shared_tokens)
        prompts = [doc + llm.tokenizer.encode(f"\n\nQuestion {i}: which line of the text above mentions "
                                              f"'{w}' first?", add_special_tokens=False)
                   for i, w in enumerate(["import", "return", "class", "while", "yield", "lambda", "assert",
                                          "global"][:args.concurrent])]
        alloc, peak = llm.engine.allocator, [0]

        def watch(_):
            peak[0] = max(peak[0], alloc.num_blocks - alloc.num_free)
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), on_step=watch)
        wall = time.perf_counter() - start
        block_bytes = llm.engine.model_config.kv_bytes_per_token(llm.engine.runner.kv_dtype.itemsize) * \
            alloc.block_size
        results["on" if caching else "off"] = {
            "wall_s": round(wall, 1), "peak_blocks": peak[0], "peak_kv_bytes": peak[0] * block_bytes,
            "prompt_tokens_computed": llm.engine.stats["prompt_tokens_computed"],
            "cached_tokens": [o.usage.cached_tokens for o in outs], "tokens": [o.outputs[0].token_ids for o in outs],
            "max_ttft_s": round(max(ttft(o) for o in outs), 2)}
        del llm
        gc.collect()
    on, off = results["on"], results["off"]
    same = sum(a == b for a, b in zip(on.pop("tokens"), off.pop("tokens")))
    return {"shared_tokens": args.shared_tokens, "concurrent": args.concurrent, "same_answers": same, **results,
            "kv_ratio": round(on["peak_kv_bytes"] / off["peak_kv_bytes"], 3),
            "wall_ratio": round(on["wall_s"] / off["wall_s"], 3)}


def random_prompts(args, common: dict) -> dict:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    engines = {c: LLM(args.model, prefix_caching=c, max_num_seqs=8, **common) for c in (True, False)}
    times = {True: [], False: []}
    for r in range(args.rounds):
        rng = random.Random(r)  # new prompts each round, the same for both engines
        prompts = [[rng.randrange(100, 30000) for _ in range(rng.randrange(256, 1024))]
                   for _ in range(args.random_prompts)]
        for caching, llm in engines.items():
            start = time.perf_counter()
            llm.generate(prompts, params)
            times[caching].append(time.perf_counter() - start)
            assert llm.engine.stats["prompt_tokens_cached"] == 0  # nothing shared: the cache must not hit
    tokens = sum(map(len, prompts)) + 32 * len(prompts)  # about the same every round
    on, off = min(times[True]), min(times[False])
    return {"prompts": len(prompts), "rounds": args.rounds, "tokens_per_round": tokens,
            "on_s": [round(t, 2) for t in times[True]], "off_s": [round(t, 2) for t in times[False]],
            "tokens_per_s_on": round(tokens / on), "tokens_per_s_off": round(tokens / off),
            "on_vs_off": round(off / on, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--parts", default="second,shared,random")
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--shared-tokens", type=int, default=16384)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--kv-cache-memory", default="4GiB")
    ap.add_argument("--random-prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dca", action="store_true")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--cache-parent", default=None, help="where the temporary --kv-cache-dir is made")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    common = {"dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.dca:
        common.update(dca=True, max_model_len=args.length + 1024)
    meta = {"model": os.path.basename(args.model or "SmolLM2-135M (bundled)"), "cpu": cpu_summary(),
            "dtype": args.dtype, "dca": args.dca, "torch_threads": torch.get_num_threads()}
    for part in args.parts.split(","):
        start = time.perf_counter()
        fn = {"second": second_question, "shared": shared_prefix, "random": random_prompts}[part]
        part_common = dict(common)
        if part == "shared":  # within the model's trained length: no DCA
            part_common = {"dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens,
                           "max_model_len": args.shared_tokens + 1024}
        result = fn(args, part_common)
        save(part, {**meta, **result, "bench_s": round(time.perf_counter() - start)})


if __name__ == "__main__":
    main()
