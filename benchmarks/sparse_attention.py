"""Sparse prefill vs dense attention, layer by layer, on a real passkey prompt (the evaluation model with DCA).

For each length: one prefill of a passkey prompt (depth 50 %; or --prompt document: natural text) with DCA and
sparse prefill on (the engine's default: the pooled estimate; --sparse-config FILE or --estimate vertical-slash:
per-head budgets), then the answer. The engine's sparse probe (megactx/attention/sparse/probe.py) records, for
every piece of every layer, the sparse kernel's time, its index-estimation time and its density; for the
--dense-layers the engine also computes the dense DCA attention of the same piece right after on the same inputs
(same process, same moment), which gives the dense time per layer and the attention recall
exp(lse_sparse - lse_dense) (mean over rows and heads).

Dense end-to-end TTFT at a length is projected (and marked so) when it is not measured: the sparse run's TTFT
minus its sparse attention and estimation time plus the dense attention time of every layer (layers not timed
densely get the mean of those that were).

  python benchmarks/sparse_attention.py --model M.gguf --lengths 32768,65536,131072 --dense-layers 0,11,23
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megactx import LLM  # noqa: E402
from megactx.attention.sparse.patterns import resolve_sparse  # noqa: E402
from megactx.attention.sparse.probe import SparseProbe  # noqa: E402
from megactx.bench.ttft import SPARSE_KERNELS  # noqa: E402
from megactx.config import SparseConfig  # noqa: E402
from megactx.config.attention import ESTIMATES, POOLED_CUTOFF  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.eval.backends import InProcessBackend  # noqa: E402
from megactx.eval.fitting import largest_fitting  # noqa: E402
from megactx.eval.passkey import MAX_NEW_TOKENS, build_prompt, make_key, score  # noqa: E402


def run_length(args, length: int) -> dict:
    llm = LLM(args.model, max_model_len=length + MAX_NEW_TOKENS + 8, max_num_seqs=1, dca=True, sparse=True,
              sparse_config=args.sparse_config, sparse_threshold=args.threshold, sparse_mass=args.mass,
              sparse_max_density=args.max_density, sparse_estimate_span=args.estimate_span,
              sparse_block_size=args.block, sparse_estimate=args.estimate, sparse_max_keys=args.max_keys,
              sparse_coarse_refine=args.coarse_refine, max_num_batched_tokens=args.chunk, num_threads=args.threads,
              dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    backend = InProcessBackend(llm)
    key = make_key(0, length, 50, 0)
    if args.prompt == "passkey":
        n = largest_fitting(lambda k: backend.count(build_prompt(k, 50, key)), length)
        ids = backend.render(build_prompt(n, 50, key))
    else:  # natural text: the ppl document (the standard library's source)
        from megactx.eval.ppl import document_ids
        ids = document_ids(llm.tokenizer, length)
    layers = llm.engine.model_config.num_hidden_layers
    dense_layers = None if args.dense_layers == "all" else {int(x) for x in args.dense_layers.split(",") if x}
    stats = SparseProbe(dense_layers=dense_layers)
    llm.engine.observe_sparse(stats)
    answer = backend.generate(ids, MAX_NEW_TOKENS)
    record = {"dense_s": stats.dense_s}
    dense_total = sum(record["dense_s"].values())
    ttft = answer.ttft_s - dense_total  # the dense side ran inside the prefill: take it out
    sparse_attn = sum(stats.attention_s.values())
    estimate = sum(stats.estimate_s.values())
    measured = sorted(record["dense_s"])
    mean_dense = dense_total / len(measured) if measured else float("nan")
    per_layer = []
    for li in range(layers):
        recall = stats.recall(li)
        dens = stats.densities(li, computed=True)
        planned = stats.densities(li)
        per_layer.append({
            "layer": li, "sparse_s": round(stats.attention_s.get(li, 0.0), 3),
            "estimate_s": round(stats.estimate_s.get(li, 0.0), 3),
            "dense_s": round(record["dense_s"][li], 3) if li in record["dense_s"] else None,
            "density": round(sum(dens) / len(dens), 4) if dens else None,
            "planned_density": round(sum(planned) / len(planned), 4) if planned else None,
            "dense_fallbacks": stats.fallbacks.get(li, 0), "chunks": len(planned),
            "planned_by_chunk": [round(x, 3) for x in planned],  # in prefill order: where the fallbacks fall
            "recall": round(float(recall.mean()), 4) if recall is not None else None})
    dense_projected = ttft - sparse_attn - estimate + sum(
        record["dense_s"].get(li, mean_dense) for li in range(layers))
    correct = score(answer.text, key)[0] if args.prompt == "passkey" else None
    return {"prompt": args.prompt, "length": length, "prompt_tokens": len(ids), "answer": answer.text, "passkey_correct": correct,
            "ttft_sparse_s": round(ttft, 2), "ttft_dense_projected_s": round(dense_projected, 2),
            "ttft_speedup_projected": round(dense_projected / ttft, 2),
            "sparse_attention_s": round(sparse_attn, 2), "estimate_s": round(estimate, 2),
            "estimate_share": round(estimate / sparse_attn, 3),
            "dense_layers_measured": measured,
            "attention_speedup": round(sum(record["dense_s"].values()) /
                                       max(sum(stats.attention_s[li] + stats.estimate_s[li] for li in measured), 1e-9), 2),
            "layers": per_layer, "chunk": args.chunk, "sparse_config": args.sparse_config or "default budgets",
            "mass": args.mass, "estimate": args.estimate, "dtype": args.dtype, "max_keys": args.max_keys,
            "coarse_refine": args.coarse_refine,
            "max_density": args.max_density, "estimate_span": args.estimate_span,
            "dca_temperature": llm.engine.dca.temperature, "kernel": _kernel(args, llm.engine.sparse.block_size),
            "dense_fallbacks": sum(stats.fallbacks.values()), "chunks": len(stats.calls),
            "kv_dtype": str(llm.engine.runner.kv_dtype).removeprefix("torch."),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "cpu": cpu_summary()}


def _kernel(args, block: int) -> str:
    # the block height is named when it is not the fp32 default the earlier rows ran with
    return SPARSE_KERNELS[args.estimate] + (f", {block}-row blocks" if block != 256 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--prompt", choices=["passkey", "document"], default="passkey",
                    help="a passkey prompt (depth 50 %%) or natural text (the standard library's source)")
    ap.add_argument("--dense-layers", default="all", help="'all' or a comma list of layers timed densely too")
    ap.add_argument("--sparse-config", default=None)
    ap.add_argument("--threshold", type=int, default=0, help="sparse above this prompt length (0: at every length measured)")
    ap.add_argument("--mass", type=float, default=None, help="--sparse-mass: cut budgets at this share of the "
                    "estimated attention (default: whole budgets)")
    ap.add_argument("--max-density", type=float, default=0.6, help="--sparse-max-density: chunks planned denser "
                    "than this are computed densely (1: the sparse kernel on every chunk)")
    ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--estimate-span", type=int, default=8192, help="--sparse-estimate-span: rows planned from one "
                    "estimate (0: one estimate per prefill chunk)")
    ap.add_argument("--estimate", choices=("auto",) + ESTIMATES, default="auto",
                    help="--sparse-estimate: how the heads are planned (default auto: pooled, at cut-off --mass, "
                         f"default {POOLED_CUTOFF}, unless budgets come from a file)")
    ap.add_argument("--dtype", default="fp32", help="compute dtype of both sides (fp32, bf16)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="--kv-cache-dtype (auto: bf16 when fp32 would not fit)")
    ap.add_argument("--block", type=int, default=None, help="sparse kernel block rows (default: by dtype, "
                    "256 in fp32, 512 in bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-keys", type=int, default=None, help="--sparse-max-keys: key budget per query block")
    ap.add_argument("--coarse-refine", type=int, default=None, help="--sparse-coarse-refine: super-groups refined")
    ap.add_argument("--out", default="benchmarks/results/sparse_attention_eval.json")
    args = ap.parse_args()
    # what the engine resolves "auto" and a default cut-off to, recorded as such: the defaults have changed
    resolved, _ = resolve_sparse(SparseConfig(config_file=args.sparse_config, estimate=args.estimate), args.model)
    args.estimate = resolved.estimate
    if resolved.estimate == "pooled" and args.mass is None:
        args.mass = resolved.pooled_cutoff
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": []}
    for length in [int(x) for x in args.lengths.split(",")]:
        row = run_length(args, length)
        results["rows"] = [r for r in results["rows"]
                           if (r["length"], r.get("prompt", "passkey"), r.get("mass"), r.get("max_density", 1.0),
                               r["sparse_config"], r.get("dca_temperature", "position"), r.get("chunk", 16384),
                               r.get("estimate_span", 0), r.get("kernel", "per span"), r.get("mass_union", False),
                               r.get("dtype", "fp32"), r.get("slash_window", 0), r.get("cpu"),
                               r.get("estimate", "vertical-slash"), r["dense_layers_measured"],
                               r.get("max_keys"), r.get("coarse_refine"), r.get("kv_dtype", "float32")) !=
                           (length, args.prompt, args.mass, args.max_density, row["sparse_config"],
                            row["dca_temperature"], args.chunk, args.estimate_span, row["kernel"],
                            False, args.dtype, 0, row["cpu"], args.estimate,
                            row["dense_layers_measured"], args.max_keys, args.coarse_refine, row["kv_dtype"])] + [row]
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        verdict = {True: "ok", False: "WRONG", None: "-"}[row["passkey_correct"]]
        print(f"{length} ({args.prompt}): passkey {verdict}, TTFT sparse {row['ttft_sparse_s']} s, "
              f"dense (projected) {row['ttft_dense_projected_s']} s ({row['ttft_speedup_projected']}x); attention "
              f"{row['attention_speedup']}x on layers {row['dense_layers_measured']}; estimation "
              f"{100 * row['estimate_share']:.1f}% of sparse attention; peak RSS {row['peak_rss_gb']} GB "
              f"({row['kv_dtype']} KV; {row['cpu']})", flush=True)
        for li in row["layers"]:
            print(f"  layer {li['layer']:2d}: sparse {li['sparse_s']:7.2f} s  estimate {li['estimate_s']:6.2f} s  "
                  f"dense {li['dense_s'] if li['dense_s'] is not None else '-':>7}  density {li['density']} "
                  f"(planned {li['planned_density']}, {li['dense_fallbacks']}/{li['chunks']} chunks dense)  "
                  f"recall {li['recall']}", flush=True)


if __name__ == "__main__":
    main()
