"""`megactx bench ttft`: time to first token, prefill tokens/s and peak RSS, this engine beside others.

Every (length, engine) runs in a process of its own, so its peak resident memory (VmHWM) is its own, and the
engines take turns at each length so that a noisy neighbour on the machine hits them alike. All engines get
the same token ids: a natural-text prompt tokenized once with the model's tokenizer. TTFT in-process is from
submitting the prompt to the first sampled token.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from megactx.config.attention import POOLED_CUTOFF
from megactx.errors import MegactxError

logger = logging.getLogger(__name__)
COMPARE = ("transformers", "llama.cpp")
# dense: plain attention (beyond the trained length plain RoPE: an ablation of speed, not quality); dca: Dual
# Chunk Attention; sparse: sparse prefill above the threshold (default 32768 tokens) planned by the vertical-slash
# estimate and default budgets; dca+sparse: both; -pooled: planned by the pooled block estimate instead (what the
# engine runs by default when no budgets file is given)
MODES = ("dense", "dca", "sparse", "dca+sparse", "sparse-pooled", "dca+sparse-pooled")
# the kernel each estimate's plans run on (megactx/attention/sparse/prefill.py), recorded with the rows
SPARSE_KERNELS = {"pooled": "batched, gathered, padded to 64 keys, 4-block tiles share",
                  "vertical-slash": "tiled, short spans gathered, merged per head"}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(model: str | None, length: int) -> list[int]:
    from megactx.eval.passkey import FILLER
    from megactx.loader import default_model_path
    from megactx.loader.tokenizer import load_tokenizer
    tok = load_tokenizer(model or default_model_path())
    text = "Summarize the following notes.\n" + FILLER * (length // 8 + 16)
    ids = tok.encode(text)
    return ids[:length]


def run_megactx(model, ids, mode, threads, chunk=4096, dtype="fp32", sparse_mass=None, local_size=None) -> dict:
    from megactx import LLM, SamplingParams
    llm = LLM(model, max_model_len=len(ids) + 8, max_num_seqs=1, num_threads=threads, dca="dca" in mode,
              sparse="sparse" in mode, allow_long_context="dca" not in mode, max_num_batched_tokens=chunk,
              dtype=dtype, sparse_mass=sparse_mass, dca_local_size=local_size,
              sparse_estimate="pooled" if mode.endswith("-pooled") else "vertical-slash")
    llm.generate(ids[:32], SamplingParams(temperature=0, max_tokens=1))  # warm-up
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1))[0]
    ttft = out.metrics["first_token_time"] - out.metrics["arrival"]
    return {"ttft_s": ttft, "dca_local_size": llm.engine.dca.local_size} if llm.engine.dca else {"ttft_s": ttft}


def run_transformers(model, ids, mode, threads, chunk=None, dtype="fp32", sparse_mass=None, local_size=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megactx.config import parse_dtype
    torch.set_num_threads(threads)
    torch_dtype = parse_dtype(dtype) or torch.float32
    from megactx.loader import default_model_path
    path = model or default_model_path()
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype, attn_implementation="sdpa")
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    m.eval()
    with torch.no_grad():
        m(torch.tensor([ids[:32]]))
        start = time.perf_counter()
        logits = m(torch.tensor([ids]), logits_to_keep=1).logits
        logits[0, -1].argmax().item()
        return {"ttft_s": time.perf_counter() - start}


def run_llamacpp(model, ids, mode, threads, chunk=None, dtype="fp32", sparse_mass=None, local_size=None) -> dict:
    from llama_cpp import Llama
    from megactx.loader import default_model_path
    llm = Llama(model_path=model or default_model_path(), n_ctx=len(ids) + 8, n_threads=threads,
                n_batch=min(2048, len(ids)), verbose=False)
    llm.eval(ids[:32])  # warm-up, as the other engines get
    llm.sample(temp=0.0)
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    llm.sample(temp=0.0)
    return {"ttft_s": time.perf_counter() - start}


RUNNERS = {"megactx": run_megactx, "transformers": run_transformers, "llama.cpp": run_llamacpp}


def unavailable(engine: str, model: str | None) -> str | None:
    """Why a comparison engine cannot run here, or None."""
    import importlib.util
    if engine == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp from source)"
        from megactx.loader import default_model_path
        if not (model or default_model_path()).endswith(".gguf"):
            return "llama.cpp needs a .gguf model file"
    return None


def worker(args) -> None:
    ids = prompt_ids(args.model, args.length)
    timed = RUNNERS[args.engine](args.model, ids, args.mode, args.threads, args.chunk, args.dtype, args.sparse_mass,
                                 args.dca_local_size)
    print("RESULT " + json.dumps({**timed, "tokens": len(ids), "peak_rss_mb": peak_rss_mb()}), flush=True)


def measure(engine: str, mode: str, length: int, args, dtype: str = "fp32", local_size: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "megactx.bench.ttft", "--worker", "--engine", engine, "--mode", mode,
           "--length", str(length), "--threads", str(args.threads), "--chunk", str(args.max_num_batched_tokens),
           "--dtype", dtype]
    cmd += ["--model", args.model] if args.model else []
    mass = args.sparse_mass if "sparse" in mode else None
    cmd += ["--sparse-mass", str(mass)] if mass is not None else []
    cmd += ["--dca-local-size", str(local_size)] if local_size is not None else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise MegactxError(f"{engine} ({mode}, {dtype}) at {length} tokens failed: {tail}")
    r = json.loads(line[7:])
    row = {"engine": engine, "mode": mode, "dtype": dtype, "length": length, "ttft_s": round(r["ttft_s"], 3),
           "prefill_tok_s": round(r["tokens"] / r["ttft_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"], 1)}
    if mass is not None:
        row["sparse_mass"] = mass
    if "dca_local_size" in r:  # the local size the engine ran with (asked for, or the model's default)
        row["dca_local_size"] = r["dca_local_size"]
    if mode.endswith("-pooled"):
        row["sparse_mass"] = POOLED_CUTOFF if mass is None else mass  # the cut-off it ran with
    if engine == "megactx" and "sparse" in mode:  # which sparse kernel ran (rows without it: the per-block one)
        row["sparse_kernel"] = SPARSE_KERNELS["pooled" if mode.endswith("-pooled") else "vertical-slash"]
    return row


def cpu_capability() -> str:
    """The cores and vector extensions here ('2 cores, AVX2 AVX512 AVX512-BF16'), recorded with every row: the
    ratios between dtypes, and between attention and the matmuls, differ from one CPU to another."""
    from megactx.config.hardware import cpu_summary
    return cpu_summary()


def run(args) -> list[dict]:
    from megactx.config import parse_dtype
    from megactx.eval.results import parse_int_list
    lengths = parse_int_list(args.lengths, "--lengths")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise MegactxError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    others = [c.strip() for c in (args.compare or "").split(",") if c.strip()]
    for c in others:
        if c not in COMPARE:
            raise MegactxError(f"--compare: unknown engine {c!r}; choose from {', '.join(COMPARE)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        parse_dtype(d)  # a clear error for an unknown name
    if args.sparse_mass is not None and not 0 < args.sparse_mass <= 1:
        raise MegactxError(f"--sparse-mass {args.sparse_mass}: a share of the attention, in (0, 1]")
    local_sizes = parse_int_list(args.dca_local_sizes, "--dca-local-sizes", "2048,16384") if args.dca_local_sizes \
        else [None]
    skipped = {c: why for c in others if (why := unavailable(c, args.model))}
    for c, why in skipped.items():
        logger.warning("skipping %s: %s", c, why)
    rows = []
    cpu = cpu_capability()
    for length in lengths:
        runs = [("megactx", m, d, size) for d in dtypes for m in modes
                for size in (local_sizes if "dca" in m else [None])]
        # llama.cpp computes in its own types: it runs once, transformers in every dtype asked for
        runs += [(c, "dense", d, None) for c in others if c not in skipped
                 for d in (dtypes if c == "transformers" else ["-"])]
        for engine, mode, dtype, size in runs:
            row = measure(engine, mode, length, args, "fp32" if dtype == "-" else dtype, size)
            row["dtype"], row["cpu"] = dtype, cpu
            base = next((r for r in rows if r["engine"] == "megactx" and r["length"] == length), None)  # first mode
            row["speedup_vs_this"] = round(row["ttft_s"] / base["ttft_s"], 2) if base and row is not base else None
            rows.append(row)
            if args.json:
                print(json.dumps({k: row[k] for k in ("engine", "mode", "dtype", "length", "ttft_s", "prefill_tok_s",
                                                      "peak_rss_mb", "sparse_mass", "dca_local_size", "sparse_kernel",
                                                      "cpu")
                                  if k in row}), flush=True)
            else:
                logger.warning("%s %s %s %d: TTFT %.2f s", engine, mode, dtype, length, row["ttft_s"])
    if not args.json:
        print("| engine | mode | dtype | length | TTFT s | prefill tok/s | peak RSS MB | TTFT / megactx first row |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = "" if r["speedup_vs_this"] is None else f"{r['speedup_vs_this']:.2f}x"
            mode = r["mode"] + (f" (mass {r['sparse_mass']})" if "sparse_mass" in r else "") \
                + (f" (local size {r['dca_local_size']})" if "dca_local_size" in r else "")
            print(f"| {r['engine']} | {mode} | {r['dtype']} | {r['length']} | {r['ttft_s']:.2f} "
                  f"| {r['prefill_tok_s']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")
        for c, why in skipped.items():
            print(f"{c}: skipped, {why}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--engine")
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--model")
    ap.add_argument("--length", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--sparse-mass", type=float, default=None)
    ap.add_argument("--dca-local-size", type=int, default=None)
    worker(ap.parse_args())
