"""What one prefill chunk's attention costs at a given depth of a long context: does the attention of a whole
prompt grow linearly with its length (the 1M-token issue: 256K -> 1M, 4x the tokens, at most ~4.5x the time)?

One attention layer of the model's shape runs the engine's Dual Chunk Attention backend with sparse prefill on the
chunk of rows [m - chunk, m) of a prompt longer than m, for each m in --lengths: the layer's cache holds m random
keys and values (in --kv-dtype, as a long prompt's bf16 cache does), the chunk's queries are random. Random keys
spread the estimate's mass evenly, so every query block's plan fills its --max-keys budget: the cost measured is
the budget's worst case. Each timed chunk runs right after the one before it, as within a prompt, so the group sums
sparse prefill keeps for a sequence cover the keys before it; the "re-reading" column times the estimate of the same
chunk without them (no sequence id), summing every key's group again. Sparse prefill's own probe
(SparsePrefill.observe) splits each chunk into estimate and kernel seconds and gives the plans' density. Dense DCA
on the same chunk is timed up to --dense-up-to keys (its cost per chunk is linear in m, so beyond that it is
extrapolated from the last measured point and marked so).

A whole prompt's attention is the sum of its chunks' costs: with the per-chunk seconds interpolated linearly between
the measured depths (and held at the first depth's value before it, an upper bound), the table's last columns are
a prompt's attention seconds for one layer and their ratio to the first length's. Dense DCA's column sums its
per-chunk line the same way.

Prints a table and writes benchmarks/results/sparse_chunk_cost.json (the CPU's flags with it).

usage: python benchmarks/sparse_chunk_cost.py --model EVAL [--lengths 131072,262144,524288,1048576]
                                              [--kv-dtype bf16] [--max-keys 8192] [--coarse-refine 32]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from megactx.attention.backend import AttentionMetadata, KVCacheTensors, SeqAttention
from megactx.attention.dca import DualChunkAttentionBackend
from megactx.attention.sparse.patterns import resolve_sparse
from megactx.attention.sparse.prefill import SparsePrefill
from megactx.attention.sparse.probe import SparseProbe
from megactx.config import DCAConfig, SparseConfig, parse_dtype
from megactx.config.hardware import cpu_summary, resolve_compute_dtype
from megactx.layers.rotary import RotaryEmbedding
from megactx.loader import open_model

HERE = os.path.dirname(os.path.abspath(__file__))


def chunk_seconds(backend: DualChunkAttentionBackend, m: int, chunk: int, shape: tuple[int, int, int],
                  sparse: bool, repeats: int, dtype: torch.dtype, seq_id: int = 0) -> tuple[float, dict]:
    """Best of `repeats`: one chunk of rows [m - chunk, m) of a prompt of m + chunk tokens, one layer, each time
    right after the chunk before it (untimed), as within a prompt: sparse prefill keeps what it carries from one
    chunk of a sequence to the next (the estimate's group sums). seq_id -1: no sequence, nothing carried over."""
    h, hkv, d = shape
    gen = torch.Generator().manual_seed(m)
    q, k, v = (torch.randn(chunk, n, d, generator=gen).to(dtype) for n in (h, hkv, hkv))

    def step(c: int) -> None:
        meta = AttentionMetadata([SeqAttention(0, chunk, c, slice(0, c + chunk), sparse=sparse,
                                               prompt_len=m + chunk, seq_id=seq_id)], slice(c, c + chunk))
        backend.begin_step(meta, torch.arange(c, c + chunk), torch.full((chunk,), m + chunk))
        backend(0, q, k, v)

    best, stats = float("inf"), {}
    for _ in range(repeats):
        if sparse:
            step(m - 2 * chunk)
        probe = SparseProbe(dense_layers=set())
        backend.sparse.observe(probe)
        start = time.perf_counter()
        step(m - chunk)
        took = time.perf_counter() - start
        backend.sparse.observe(None)
        if took < best:
            best, stats = took, probe.summary()
    return best, stats


def prompt_seconds(depths: list[int], per_chunk: list[float], length: int, chunk: int) -> float:
    """Sum over a prompt's chunks of the per-chunk seconds, linear between the measured depths, held at the first
    depth's value before it and extrapolated along the last segment beyond the last."""
    xs = torch.tensor(depths, dtype=torch.float64)
    ys = torch.tensor(per_chunk, dtype=torch.float64)
    ends = torch.arange(chunk, length + 1, chunk, dtype=torch.float64)
    if len(depths) == 1:
        return float(ys[0]) * len(ends)
    i = torch.clamp(torch.searchsorted(xs, ends) - 1, 0, len(depths) - 2)
    t = ys[i] + (ys[i + 1] - ys[i]) * (ends - xs[i]) / (xs[i + 1] - xs[i])
    return float(torch.where(ends < xs[0], ys[0], t).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model file or folder: its attention shape and DCA settings")
    ap.add_argument("--lengths", default="131072,262144,524288,1048576")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: as the engine picks for this CPU)")
    ap.add_argument("--kv-dtype", default="bf16", help="the cache's dtype (auto: the compute dtype)")
    ap.add_argument("--max-keys", type=int, default=8192)
    ap.add_argument("--coarse-refine", type=int, default=32)
    ap.add_argument("--dense-up-to", type=int, default=262144, help="time dense DCA's chunk up to this many keys")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sparse_chunk_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mc = open_model(args.model).config
    shape = (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    dtype, dtype_name, _ = resolve_compute_dtype(args.dtype, "cpu")
    kv_dtype = parse_dtype(args.kv_dtype) or dtype
    dca = DCAConfig(enabled=True).resolve(mc)
    sparse = resolve_sparse(SparseConfig(estimate="pooled", max_keys=args.max_keys,
                                         coarse_refine=args.coarse_refine), None, dtype_name)
    rows = []
    print(f"{'keys':>8}  {'estimate s':>10}  {'re-reading':>10}  {'kernel s':>8}  {'chunk s':>7}  {'density':>7}  "
          f"{'dense DCA s':>11}", flush=True)
    for m in lengths:
        cache = KVCacheTensors(1, shape[1], shape[2], m, kv_dtype, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        for t in (cache.k[0], cache.v[0]):  # the prompt's first m - chunk keys, as a long prefill leaves them
            for lo in range(0, m, 65536):
                hi = min(m, lo + 65536)
                t[:, lo:hi] = torch.randn(shape[1], hi - lo, shape[2], generator=gen).to(kv_dtype)
        prefill = SparsePrefill(*sparse, 1, shape[0], shape[2] ** -0.5)
        backend = DualChunkAttentionBackend(*shape, cache, dca, RotaryEmbedding(mc, torch.device("cpu")), prefill)
        sparse_s, stats = chunk_seconds(backend, m, args.chunk, shape, True, args.repeats, dtype)
        _, fresh = chunk_seconds(backend, m, args.chunk, shape, True, args.repeats, dtype, seq_id=-1)
        row = {"keys": m, "chunk_s": round(sparse_s, 3), "estimate_s": stats["estimate_s"],
               "estimate_rereading_s": fresh["estimate_s"],
               "kernel_s": stats["sparse_attention_s"], "density": stats["sparse_density"],
               "fallbacks": stats["fallbacks"]}
        if m <= args.dense_up_to:
            row["dense_chunk_s"] = round(chunk_seconds(backend, m, args.chunk, shape, False, 1, dtype)[0], 3)
        rows.append(row)
        dense = row.get("dense_chunk_s")
        print(f"{m:8d}  {row['estimate_s']:10.3f}  {row['estimate_rereading_s']:10.3f}  {row['kernel_s']:8.3f}  "
              f"{sparse_s:7.3f}  {row['density']:7.4f}  {'-' if dense is None else f'{dense:.2f}':>11}", flush=True)
        del cache, backend
    depths = [r["keys"] for r in rows]
    sparse_line = [r["chunk_s"] for r in rows]
    measured = [(r["keys"], r["dense_chunk_s"]) for r in rows if "dense_chunk_s" in r]
    print(f"\none layer, a whole prompt's attention ({args.chunk}-token chunks):")
    print(f"{'tokens':>8}  {'sparse s':>9}  {'x first':>7}  {'dense DCA s':>11}")
    for r in rows:
        m = r["keys"]
        r["prompt_sparse_s"] = round(prompt_seconds(depths, sparse_line, m, args.chunk), 1)
        if measured:  # dense per chunk is linear in the keys: a line through 0 and the deepest measured chunk
            slope = measured[-1][1] / measured[-1][0]
            r["prompt_dense_s"] = round(slope * args.chunk * sum(range(1, m // args.chunk + 1)), 1)
            r["dense_extrapolated"] = m > measured[-1][0]
        r["sparse_growth"] = round(r["prompt_sparse_s"] / rows[0]["prompt_sparse_s"], 2)
        print(f"{m:8d}  {r['prompt_sparse_s']:9.1f}  {r['sparse_growth']:6.2f}x  "
              f"{r.get('prompt_dense_s', '-'):>11}{' (extrapolated)' if r.get('dense_extrapolated') else ''}")
    result = {"cpu": cpu_summary(), "threads": args.threads, "chunk": args.chunk, "kv_dtype": args.kv_dtype,
              "compute_dtype": dtype_name, "max_keys": args.max_keys, "coarse_refine": args.coarse_refine,
              "dca": dca.describe(), "scope": f"one attention layer ({shape[0]} heads, {shape[1]} KV heads, dim "
                                              f"{shape[2]}), random keys: every plan fills its key budget",
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
