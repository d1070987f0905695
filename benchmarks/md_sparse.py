"""BENCHMARKS.md's sparse prefill sections, from benchmarks/results/sparse_*.json (make_benchmarks_md.py)."""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from md_sparse_studies import (block_plans_section, estimate_queries_section, oracle_section,  # noqa: E402
                               sparse_density_section, sparse_kernel_section)


def sparse_table(rows: list[dict]) -> list[str]:
    out = ["| prompt | length | prompt tokens | budgets | DCA temperature | mass cut-off | prefill chunk (rows per estimate) | kernel calls | dense above density (chunks dense) | passkey (depth 50 %) "
           "| TTFT sparse s | TTFT dense s (projected) | speedup | attention speedup (layers timed densely) "
           "| attention speedup, all layers (dense: the timed layers' mean where not timed) | estimation / sparse attention | mean density "
           "| mean recall |",
           "|---|---:|---:|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dens = [x["density"] for x in r["layers"] if x["density"] is not None]
        rec = [x["recall"] for x in r["layers"] if x["recall"] is not None]
        timed = r["dense_layers_measured"]
        timed_s = "all" if len(timed) == len(r["layers"]) else ", ".join(map(str, timed))
        verdict = {True: "correct", False: "wrong", None: "-"}[r["passkey_correct"]]
        fallback = (f"{r['max_density']} ({r['dense_fallbacks']}/{r['chunks']})" if "max_density" in r
                    else "never")  # rows measured before the dense fallback existed
        budgets = _budgets(r)
        dense = [x["dense_s"] for x in r["layers"] if x["dense_s"] is not None]
        # every layer's sparse time with its estimation, against the timed layers' mean dense time for the others
        all_layers = len(r["layers"]) * sum(dense) / len(dense) / sum(map(_sparse_s, r["layers"]))
        temperature = r.get("dca_temperature", "position")  # rows without it ran when position was the default
        out.append(f"| {r.get('prompt', 'passkey')} | {r['length']} | {r['prompt_tokens']} | {budgets} | {temperature} | "
                   f"{r.get('mass') or '-'}{' (union)' if r.get('mass_union') else ''} | {_rows_per_estimate(r)} | {r.get('kernel', 'per span')}"
                   f"{', in ' + r['dtype'] if r.get('dtype', 'fp32') != 'fp32' else ''}"
                   f"{', on an ' + r['cpu'] + ' CPU' if r.get('cpu') else ''} | "
                   f"{fallback} | {verdict} | {r['ttft_sparse_s']:.0f} | {r['ttft_dense_projected_s']:.0f} | "
                   f"{r['ttft_speedup_projected']:.2f}x | {r['attention_speedup']:.2f}x ({timed_s}) | {all_layers:.2f}x | "
                   f"{100 * r['estimate_share']:.1f} % | {sum(dens) / len(dens):.3f} | {sum(rec) / len(rec):.4f} |")
    return out


def _sparse_s(layer: dict) -> float:
    """A layer's sparse side: the kernel and the index estimation it needs."""
    return layer["sparse_s"] + layer["estimate_s"]


def per_layer_tables(rows: list[dict]) -> list[str]:
    """Per length, the last row that timed every layer densely: each layer's two sides of the same pieces."""
    latest = {}
    for r in rows:
        if len(r["dense_layers_measured"]) == len(r["layers"]) and r.get("prompt", "passkey") == "passkey":
            latest[r["length"]] = r  # the rows are in the file's order within a length: the last one wins
    out = []
    for length, r in sorted(latest.items()):
        sparse = sum(map(_sparse_s, r["layers"]))
        dense = sum(x["dense_s"] for x in r["layers"])
        out += [f"#### Attention time per layer at {length} tokens, every layer timed both ways", "",
                f"The last row above at {length} tokens that timed every layer (budgets: {_budgets(r)}; kernel: "
                f"{r.get('kernel', 'per span')}): in one prefill, "
                "each piece of each layer ran sparse (the engine's path, whose output the model goes on with) and "
                "then dense DCA on the same inputs. Sparse counts the index estimation. Over all layers: sparse "
                f"{sparse:.0f} s, dense {dense:.0f} s, **{dense / sparse:.2f}x**.", "",
                "| layer | density | recall | sparse s (estimation s) | dense s | speedup |",
                "|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {x['layer']} | {x['density']:.3f} | {x['recall']:.3f} | {_sparse_s(x):.1f} "
                f"({x['estimate_s']:.1f}) | {x['dense_s']:.1f} | {x['dense_s'] / _sparse_s(x):.2f}x |"
                for x in r["layers"]]
        out.append("")
    return out


def _rows_per_estimate(r: dict) -> str:
    chunk = r.get("chunk", 16384)
    span = r.get("estimate_span") or chunk  # rows without it ran with one estimate per chunk
    return f"{chunk} ({min(span, chunk)})"


def _budgets(r: dict) -> str:
    window = f", slashes in windows of {r['slash_window']} (budget in keys)" if r.get("slash_window") else ""
    if r.get("estimate") == "pooled":
        return f"pooled block estimate, cut-off {r.get('mass') or 0.8}"
    if r["sparse_config"] == "default budgets":
        return "default" + window
    name = os.path.basename(r["sparse_config"])
    return f"{'refined' if 'refined' in name else 'searched'} (`{name}`){window}"


def sparse_smollm2() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_attention_smollm2.json")
    if not os.path.exists(path):
        return []
    rows = sorted(json.load(open(path))["rows"], key=lambda r: (r["length"], r.get("mass") or 1.0))
    return ["### SmolLM2 with DCA, default budgets with and without the mass cut-off", "",
            "`python benchmarks/sparse_attention.py --model SMOLLM2 --lengths 16384 --chunk 8192 [--mass 0.95]`, "
            "the two runs one after the other while other work shared the CPU (the ratios inside a row hold, "
            "the seconds do not compare across rows).", ""] + sparse_table(rows) + [""]


def sparse_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_attention_eval.json")
    if not os.path.exists(path):
        return sparse_smollm2()
    rows = sorted(json.load(open(path))["rows"], key=lambda r: (r.get("prompt", "passkey"), r["length"]))
    out = sparse_table(rows)
    out += [f"- {r.get('prompt', 'passkey')} {r['length']}: {r['note']}" for r in rows if r.get("note")]
    out.append("")
    out += per_layer_tables(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        for r in rows:
            xs = [x["layer"] for x in r["layers"] if x["recall"] is not None]
            label = f"{r.get('prompt', 'passkey')} {r['length']}, {_budgets(r).split(' ')[0]}" + (
                f", mass {r['mass']}" if r.get("mass") else "")
            a1.plot(xs, [x["recall"] for x in r["layers"] if x["recall"] is not None], marker="o", label=label)
            a2.plot([x["layer"] for x in r["layers"]], [x["density"] for x in r["layers"]], marker=".", label=label)
        a1.set(title="attention recall per layer", xlabel="layer", ylabel="exp(lse_sparse - lse_dense)")
        a2.set(title="computed fraction of causal pairs", xlabel="layer", ylabel="density")
        a1.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "results", "sparse_layers.png"), dpi=100)
        out += ["![recall and density per layer](benchmarks/results/sparse_layers.png)", ""]
    except ImportError:
        pass
    return (out + end_to_end_section() + sparse_kernel_section() + searched_config_section() + sparse_smollm2()
            + sparse_threshold_section() + sparse_density_section() + estimate_queries_section()
            + oracle_section() + block_plans_section())


END_TO_END = "ttft_sparse_eval.jsonl"  # make_benchmarks_md's generic TTFT section leaves this file to this one


def end_to_end_section() -> list[str]:
    """Measured, not projected: whole prefills with sparse prefill on and off (`megactx bench ttft`)."""
    path = os.path.join(HERE, "results", END_TO_END)
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = ["### Time to first token, both sides measured", "",
           "`megactx bench ttft --model EVAL --lengths 65536 --modes dca,dca+sparse --sparse-mass 0.95 "
           "--max-num-batched-tokens 8192 --dtypes DTYPE --json`: two whole prefills of the same prompt (filler text, "
           "not the passkey prompt of the table above), each in a process of its own after a 32-token warm-up, dense "
           "DCA first; nothing projected. CPU: the vector instructions torch's kernels use on the machine of the run "
           "(the AVX512 machine has AMX too, where bf16 is fast; without AVX512-BF16 or AMX bf16 is several times "
           "slower than fp32 and was not run).", "",
           "`--modes dca,dca+sparse-pooled` runs the pooled block estimate (`--sparse-estimate pooled`, at the "
           "cut-off in brackets: `--sparse-mass`, else the default of the run). Each sparse row is set against the "
           "dense row of the same run (the one just before it; one run, `--modes dca+sparse-pooled,dca` with "
           "the batched kernel before its tiles, measured the sparse side first). The last two runs: an AVX512 "
           "machine without AMX.", "",
           "| length | CPU | dtype | sparse mode (cut-off) | TTFT dense DCA s | TTFT sparse s | speedup "
           "| peak RSS MB dense / sparse |",
           "|---:|---|---|---|---:|---:|---:|---:|"]
    def key(r: dict) -> tuple:
        return r["length"], r["dtype"], r.get("cpu")

    for i, r in enumerate(rows):
        if "sparse" not in r["mode"]:
            continue
        # the dense row of the same run: the one just before it, or just after it where the run did sparse first
        dense = next((d for d in (rows[i - 1] if i else None, rows[i + 1] if i + 1 < len(rows) else None)
                      if d and d["mode"] == "dca" and key(d) == key(r)), None)
        if dense:
            mode = f"{r['mode']} ({r.get('sparse_mass', '-')})"
            out.append(f"| {r['length']} | {r.get('cpu', '-')} | {r['dtype']} | {mode} | {dense['ttft_s']:.0f} | "
                       f"{r['ttft_s']:.0f} | {dense['ttft_s'] / r['ttft_s']:.2f}x | "
                       f"{dense['peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} |")
    return out + [""]


SEARCHED_HOW = (
    "`megactx sparse search EVAL --length 32000 --text TORCH_SOURCE --out FILE`, where TORCH_SOURCE is the installed "
    "torch package's Python source concatenated in path order (`find .../site-packages/torch -name '*.py' | "
    "LC_ALL=C sort | xargs cat`): real code, but not the perplexity document. Each head takes the cheapest of "
    "MInference's candidates whose recall on the last 256 rows reaches 0.95, else the best one. Rows 'searched' "
    "above use it through `--sparse-config FILE`.")
REFINED_HOW = (
    "`megactx sparse search EVAL --refine --length 65536 --dca --sparse-config SEARCHED --text TORCH_SOURCE "
    "--out FILE` (threshold 0.9, step 2048, one pass), SEARCHED being the file above: one sparse prefill of 64K "
    "tokens with the searched budgets, each piece also computed densely; every head whose mean recall "
    "exp(lse_sparse - lse_dense) fell below 0.9 became vertical-and-slash with 2048 more verticals and slashes "
    "(the Qwen2.5-1M report's Algorithm 1). Perplexity at 64K with them (16K chunks planned in 8K parts): "
    "column `dca-sparse-refined` of the perplexity table, worst bucket 1.032x dense DCA (49152-53248; every "
    "other bucket within 1.013x), whole document 1.003x.")


def searched_config_section() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "sparse_config_*.json"))):
        layers = json.load(open(path))
        kinds: dict[str, int] = {}
        for layer in layers:
            for kind, *_ in layer.values():
                kinds[kind] = kinds.get(kind, 0) + 1
        means = [sum(e[3] for e in layer.values()) / len(layer) for layer in layers]
        worst = min(e[3] for layer in layers for e in layer.values())
        refined = "refined" in os.path.basename(path)
        how = REFINED_HOW if refined else SEARCHED_HOW
        recall = ("recall of the searched budgets at 65536 tokens, before raising (mean per layer)" if refined
                  else "recall at 32000 tokens (mean per layer)")
        out += [f"### {'Refined' if refined else 'Searched'} budgets (`{os.path.relpath(path, ROOT)}`)", "", how, "",
                f"- heads: {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}",
                f"- {recall}: {min(means):.3f} to {max(means):.3f}; worst head {worst:.3f}", ""]
    return out


def sparse_threshold_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_threshold.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    out = [f"### Below the threshold ({d['model']})", "",
           "`python benchmarks/sparse_threshold.py`: sparse prefill on (threshold "
           f"{d['threshold']}) vs `--no-sparse`, alternating in one process, best of 3, while other work shared the "
           "CPU. Below the threshold the engine takes the dense path: no sparse chunk ran, and the times agree within "
           "the machine's noise.", "",
           "| length | TTFT sparse on s | TTFT --no-sparse s | on / off | sparse chunks |", "|---:|---:|---:|---:|---:|"]
    out += [f"| {r['length']} | {r['ttft_sparse_on_s']:.2f} | {r['ttft_sparse_off_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['sparse_chunks']} |" for r in d["rows"]]
    return out + [""]
