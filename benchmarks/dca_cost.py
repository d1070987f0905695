"""Dual Chunk Attention costs what dense attention costs (issue: DCA, item 3).

Dense and DCA engines on the same model, loaded in one process and measured alternately on the same token ids
(the machine is shared): prefill time to the first token and decode tokens/s at each length. Dense beyond the
trained length runs plain RoPE (allow_long_context): its output is not the point, its cost is.
Sparse prefill is off on both sides: this compares DCA's dense attention with plain dense attention.
Prints a table and writes JSON.

--attention-only measures one attention layer of the model's shape instead of the whole model (a 64K prefill of
the whole model takes tens of minutes per side here; attention is the only part DCA changes): random queries,
keys and values, fed through each backend in prefill chunks of --chunk tokens as the engine does (the rotary
embedding of queries and keys included: DCA rotates the queries three ways), then --decode-n decode steps.

usage: python benchmarks/dca_cost.py [--model PATH] [--lengths 16384,65536] [--decode-n 16] [--attention-only]
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
    ap.add_argument("--attention-only", action="store_true", help="one attention layer of the model's shape")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk of --attention-only (the engine's default)")
    args = ap.parse_args()
    if args.attention_only:
        return attention_only(args)
    from megactx import LLM, SamplingParams
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + args.decode_n + 8
    engines = {mode: LLM(args.model, max_model_len=max_len, max_num_seqs=1, num_threads=args.threads,
                         dca=mode == "dca", allow_long_context=mode == "dense", sparse=False)
               for mode in ("dense", "dca")}
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
    report(args, lengths, rows, "")


def report(args, lengths, rows, suffix: str, extra: dict | None = None) -> None:
    print("| length | dense prefill s | DCA prefill s | DCA / dense | dense decode tok/s | DCA decode tok/s | dense / DCA |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        d, c = (next(r for r in rows if r["mode"] == m and r["length"] == n) for m in ("dense", "dca"))
        print(f"| {n} | {d['prefill_s']:.1f} | {c['prefill_s']:.1f} | {c['prefill_s'] / d['prefill_s']:.2f}x | "
              f"{d['decode_tok_s']:.2f} | {c['decode_tok_s']:.2f} | {d['decode_tok_s'] / c['decode_tok_s']:.2f}x |")
    name = os.path.basename(args.model or "smollm2").removesuffix(".gguf")
    out = args.out or os.path.join(HERE, "results", f"dca_cost_{name}{suffix}.json")
    with open(out, "w") as f:
        json.dump({"model": name, **(extra or {}), "rows": rows}, f, indent=1)


def attention_only(args) -> None:
    import torch
    from megactx.attention.backend import AttentionMetadata, DenseAttentionBackend, KVCacheTensors, SeqAttention
    from megactx.attention.dca import DualChunkAttentionBackend
    from megactx.config import DCAConfig
    from megactx.layers.rotary import RotaryEmbedding, apply_rotary
    from megactx.loader import open_model
    torch.set_num_threads(args.threads)
    mc = open_model(args.model).config
    h, hkv, d = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    cpu = torch.device("cpu")
    rotary = RotaryEmbedding(mc, cpu)
    dca = DCAConfig(enabled=True).resolve(mc)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for n in lengths:
        total = n + args.decode_n
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(total, heads, d, generator=gen) for heads in (h, hkv, hkv))
        for mode in ("dense", "dca"):
            cache = KVCacheTensors(1, hkv, d, total, torch.float32, cpu)
            if mode == "dca":
                backend = DualChunkAttentionBackend(h, hkv, d, cache, dca, rotary)
            else:
                backend = DenseAttentionBackend(h, hkv, d, cache)

            def step(c: int, m: int) -> None:
                # rows [c, c + m) as one engine step of one sequence, rotary embedding included
                pos = torch.arange(c, c + m)
                meta = AttentionMetadata([SeqAttention(0, m, c, slice(0, c + m))], slice(c, c + m))
                key_pos = backend.begin_step(meta, pos, torch.full((m,), c + m))
                if mode == "dca":
                    k_rot = apply_rotary(k[c:c + m], *rotary.cos_sin(key_pos))
                    backend(0, q[c:c + m], k_rot, v[c:c + m])
                else:
                    cos, sin = rotary.cos_sin(pos)
                    backend(0, apply_rotary(q[c:c + m], cos, sin), apply_rotary(k[c:c + m], cos, sin), v[c:c + m])

            start = time.perf_counter()
            for c in range(0, n, args.chunk):
                step(c, min(args.chunk, n - c))
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for c in range(n, total):
                step(c, 1)
            decode = args.decode_n / (time.perf_counter() - start)
            rows.append({"mode": mode, "length": n, "prefill_s": round(prefill, 3), "decode_tok_s": round(decode, 1)})
            print(f"  {mode:5} {n:7}: prefill {prefill:8.2f} s, decode {decode:8.1f} tok/s", file=sys.stderr, flush=True)
    report(args, lengths, rows, "_attention", {"scope": f"one attention layer ({h} heads, {hkv} KV heads, dim {d}), "
                                                        f"prefill chunks of {args.chunk}", "dca": dca.describe()})


if __name__ == "__main__":
    main()
