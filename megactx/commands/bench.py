"""`megactx bench serve | ttft`: latency of a running server; time to first token beside other engines."""
from __future__ import annotations

import argparse
import os

from megactx.commands.flags import env_value


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bs = b.add_parser("serve", help="latency and throughput of a running server (loopback)")
    bs.add_argument("--base-url", required=True)
    bs.add_argument("--api-key", default=env_value("--api-key"))
    bs.add_argument("--model", default=None)
    bs.add_argument("--concurrency", type=int, default=1)
    bs.add_argument("--requests", type=int, default=8)
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--long-prompt-tokens", type=int, default=0,
                    help="first send one prompt of about this many tokens, to measure latency during its prefill")
    bs.add_argument("--long-prompt-delay", type=float, default=2.0)
    bs.add_argument("--allow-remote", action="store_true", help=argparse.SUPPRESS)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=run_serve)

    from megactx.bench.ttft import MODES
    from megactx.config.attention import POOLED_CUTOFF
    p = b.add_parser("ttft", help="time to first token vs length, beside transformers / llama.cpp")
    p.add_argument("--model", default=env_value("--model"))
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--modes", default="dense", help=f"comma list of {', '.join(MODES)} (sparse: the vertical-slash "
                   "estimate with default budgets; -pooled: the pooled block estimate, the default without budgets)")
    p.add_argument("--dtypes", default="fp32", help="comma list of compute dtypes: fp32, bf16, fp16")
    p.add_argument("--compare", default="", help="comma list: transformers, llama.cpp")
    p.add_argument("--threads", type=int, default=env_value("--threads", int, os.cpu_count() or 1))
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="this engine's prefill chunk")
    p.add_argument("--sparse-mass", type=float, default=None,
                   help=f"the sparse modes' --sparse-mass (cut-off; the -pooled modes default to {POOLED_CUTOFF})")
    p.add_argument("--dca-local-sizes", default="", help="comma list of DCA local sizes: each mode with dca runs "
                   "once per size, side by side (default: the model's, chunk size / 16)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.set_defaults(func=run_ttft)


def run_serve(args) -> int:
    from megactx.bench.serve import main
    return main(args)


def run_ttft(args) -> int:
    from megactx.bench.ttft import run
    run(args)
    return 0
