"""Prefill and decode speed, this engine vs transformers, side by side in one run (issue: engine core).

Both engines are loaded in one process and measured alternately on the same token ids (2 threads, fp32), best of
--repeat runs, because the machine is shared. Prefill: time to the first token of a prompt of L tokens, through
each engine's generate(). Decode: tokens/s of 32 greedy tokens after a 4K-token prompt, timed from the first token to the last.
Peak RSS: each engine alone in a subprocess, prefilling the longest prompt. Prints a table and writes JSON.

usage: python benchmarks/engine_vs_transformers.py [--models smollm2,eval] [--lengths 1024,4096,16384]
       [--out benchmarks/results/engine_vs_transformers.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from megactx.bench.ttft import peak_rss_mb  # VmHWM of this process

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_MODEL = os.path.expanduser("~/.cache/megactx/models/qwen2.5-coder-0.5b-instruct.gguf")


def prompt_ids(length: int, vocab: int = 40000) -> list[int]:
    return [(i * 7919) % vocab + 100 for i in range(length)]


class Megactx:
    name = "megactx"
    weight_dtype = "auto"  # fp16 storage for quantized GGUF weights

    def __init__(self, model: str, max_len: int, chunk: int):
        from megactx import LLM
        self.llm = LLM(model, max_num_batched_tokens=chunk, max_model_len=max_len, num_threads=2,
                       max_num_seqs=1, weight_dtype=self.weight_dtype)

    def generate(self, ids: list[int], n: int) -> None:
        from megactx import SamplingParams
        self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    def decode_rate(self, ids: list[int], n: int) -> float:
        """Tokens/s from the first sampled token to the last (prefill excluded)."""
        from megactx import SamplingParams
        stamps = []
        self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True),
                          on_step=lambda outs: stamps.append(time.perf_counter()))
        return n / (stamps[-1] - stamps[-n - 1])


class MegactxFp32(Megactx):
    name = "megactx-fp32w"
    weight_dtype = "fp32"  # weights kept in fp32, as transformers does


class Transformers:
    name = "transformers"

    def __init__(self, model: str, max_len: int, chunk: int):
        import torch
        from transformers import AutoModelForCausalLM
        folder, name = os.path.split(model)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()

    def generate(self, ids: list[int], n: int) -> None:
        with self.torch.no_grad():
            self.m.generate(self.torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def decode_rate(self, ids: list[int], n: int) -> float:
        """generate() as users run it, timed by a streamer from the first new token to the last."""
        from transformers.generation.streamers import BaseStreamer
        stamps = []

        class Stamps(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass
        with self.torch.no_grad():
            self.m.generate(self.torch.tensor([ids]), max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False,
                            streamer=Stamps())
        return n / (stamps[-1] - stamps[-n - 1])  # stamps[0] is the prompt

    def forward_decode_rate(self, ids: list[int], n: int) -> float:
        """Greedy decode with the KV cache, model forward calls only (no generate() overhead)."""
        torch = self.torch
        with torch.no_grad():
            out = self.m(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(n):
                out = self.m(tok, past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return n / (time.perf_counter() - t)


ENGINES = {"megactx": Megactx, "megactx-fp32w": MegactxFp32, "transformers": Transformers}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(args) -> None:
    """Measure one engine's peak RSS for the longest prompt (a process of its own)."""
    import torch
    torch.set_num_threads(2)
    eng = ENGINES[args.engine](args.model, args.max_len, args.chunk)
    eng.generate(prompt_ids(int(args.lengths.split(",")[-1])), 1)
    print("RESULT " + json.dumps({"peak_rss_mb": peak_rss_mb()}))


def measure(path: str, lengths: list[int], args) -> dict:
    """Both engines in this process, measurements alternated, best of --repeat (the machine is shared)."""
    import torch
    torch.set_num_threads(2)
    max_len = max(lengths + [args.decode_ctx]) + args.decode_n + 8
    engines = [cls(path, max_len, args.chunk) for cls in ENGINES.values()]
    for e in engines:
        e.generate(prompt_ids(64), 2)  # warm-up
    best = {e.name: {} for e in engines}
    for _ in range(args.repeat):
        for n in lengths:
            for e in engines:
                t = timed(lambda: e.generate(prompt_ids(n), 1))
                best[e.name][n] = min(best[e.name].get(n, t), t)
                print(f"  {e.name:13} prefill {n:6}: {t:7.2f} s", file=sys.stderr, flush=True)
        for e in engines:  # decode: 32 tokens after a 4K prompt
            dec = e.decode_rate(prompt_ids(args.decode_ctx), args.decode_n)
            best[e.name]["decode"] = max(best[e.name].get("decode", 0), dec)
            print(f"  {e.name:13} decode: {dec:7.1f} tok/s", file=sys.stderr, flush=True)
            if hasattr(e, "forward_decode_rate"):
                dec = e.forward_decode_rate(prompt_ids(args.decode_ctx), args.decode_n)
                best[e.name]["forward_decode"] = max(best[e.name].get("forward_decode", 0), dec)
                print(f"  {e.name:13} forward-only decode: {dec:7.1f} tok/s", file=sys.stderr, flush=True)
    for e in engines:
        cmd = [sys.executable, __file__, "--engine", e.name, "--model", path,
               "--lengths", str(args.rss_length or max(lengths)),
               "--max-len", str(max_len), "--chunk", str(args.chunk)]
        env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        best[e.name]["rss"] = json.loads(line[7:])["peak_rss_mb"] if line else float("nan")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,eval")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--decode-ctx", type=int, default=4096)
    ap.add_argument("--decode-n", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4096, help="megactx max_num_batched_tokens")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "engine_vs_transformers.json"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rss-length", type=int, default=None, help="prompt length of the peak-RSS runs (default: longest)")
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
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
        lengths = [int(x) for x in args.lengths.split(",")]
        best = measure(path, lengths, args)
        ref = best["transformers"]
        for ours_name in ("megactx", "megactx-fp32w"):
            ours = best[ours_name]
            for n in lengths:
                results.append({"model": name, "engine": ours_name, "metric": "prefill_tok_s", "length": n,
                                "megactx": n / ours[n], "transformers": n / ref[n], "ratio": ref[n] / ours[n]})
            results.append({"model": name, "engine": ours_name, "metric": "decode_tok_s", "length": args.decode_ctx,
                            "megactx": ours["decode"], "transformers": ref["decode"],
                            "ratio": ours["decode"] / ref["decode"]})
            results.append({"model": name, "engine": ours_name, "metric": "decode_tok_s (vs forward loop)",
                            "length": args.decode_ctx, "megactx": ours["decode"],
                            "transformers": ref["forward_decode"], "ratio": ours["decode"] / ref["forward_decode"]})
            results.append({"model": name, "engine": ours_name, "metric": "peak_rss_mb",
                            "length": args.rss_length or max(lengths),
                            "megactx": ours["rss"], "transformers": ref["rss"], "ratio": ref["rss"] / ours["rss"]})
    print(f"{'model':8} {'engine':14} {'metric':31} {'length':>7} {'megactx':>10} {'transformers':>13} {'ratio':>6}")
    for r in results:
        print(f"{r['model']:8} {r['engine']:14} {r['metric']:31} {r['length']:>7} {r['megactx']:>10.1f} {r['transformers']:>13.1f} "
              f"{r['ratio']:>5.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": 2, "dtype": "fp32", "chunk": args.chunk, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
