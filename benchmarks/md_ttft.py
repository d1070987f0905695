"""STUDIES.md part for `megactx bench ttft` runs: each results/ttft_*.jsonl file as a table of its own (but the
sparse section's end-to-end file), every row against megactx's first row of the same length."""
from __future__ import annotations

import glob
import json
import os

from md_sparse import END_TO_END

HERE = os.path.dirname(os.path.abspath(__file__))


def ttft_section() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "ttft_*.jsonl"))):
        if os.path.basename(path) == END_TO_END:  # the sparse section's
            continue
        rows = [json.loads(line) for line in open(path) if line.strip()]
        out += [f"### {os.path.basename(path)[5:-6]}", "",
                "| engine | mode | dtype | length | TTFT s | prefill tok/s | peak RSS MB | TTFT / megactx's first row |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            base = next((b for b in rows if b["engine"] == "megactx" and b["length"] == r["length"]), None)
            ratio = f"{r['ttft_s'] / base['ttft_s']:.2f}x" if base and base is not r else ""
            mode = r["mode"] + (f" (local size {r['dca_local_size']})" if "dca_local_size" in r else "") + \
                (f", cut-off {r['sparse_mass']}" if r.get("sparse_mass") else "")
            out.append(f"| {r['engine']} | {mode} | {r.get('dtype', 'fp32')} | {r['length']} | {r['ttft_s']:.2f} "
                       f"| {r['prefill_tok_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")
        out.append("")
    return out
