"""Decode attention over a long cache: GQA packed into one call per KV head (megactx/attention/dense.py) against
the kernel's own GQA, which reads each KV head once for every query head sharing it.

One decode row of the evaluation model's shape (14 query heads on 2 KV heads, head dim 64) over 16K to 1M cached
keys, in bf16 (the long-context default) and fp32, both calls alternating in one process, best of 5.

  python benchmarks/decode_attention.py [--lengths 16384,65536,262144,1048576]
      [--out benchmarks/results/decode_attention.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megactx.attention.dense import attention, flash_cpu  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402

H, HKV, D = 14, 2, 64


def per_head_gqa(q, k, v, scale):
    """The kernel's GQA: query heads [1, H, 1, D] against [1, Hkv, m, D], no packing."""
    return flash_cpu(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale)


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,65536,262144,1048576")
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    args = ap.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for m in (int(x) for x in args.lengths.split(",")):
            q = torch.randn(1, H, D, dtype=dtype)
            k, v = torch.randn(HKV, m, D, dtype=dtype), torch.randn(HKV, m, D, dtype=dtype)
            packed = best_ms(lambda: attention(q, k, v, D ** -0.5, causal=False))
            per_head = best_ms(lambda: per_head_gqa(q, k, v, D ** -0.5))
            rows.append({"keys": m, "dtype": str(dtype).removeprefix("torch."), "packed_ms": round(packed, 2),
                         "per_head_ms": round(per_head, 2), "speedup": round(per_head / packed, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nCPU: {cpu_summary()}; {torch.get_num_threads()} threads; one decode row, {H} heads on {HKV} KV heads")
    print("| keys | dtype | packed ms | per-head GQA ms | speedup |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['keys']} | {r['dtype']} | {r['packed_ms']} | {r['per_head_ms']} | {r['speedup']}x |")
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu_summary(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
