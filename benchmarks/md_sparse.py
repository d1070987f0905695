"""BENCHMARKS.md's sparse prefill sections, from benchmarks/results/sparse_*.json (make_benchmarks_md.py)."""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def sparse_table(rows: list[dict]) -> list[str]:
    out = ["| prompt | length | prompt tokens | budgets | DCA temperature | mass cut-off | prefill chunk (rows per estimate) | kernel calls | dense above density (chunks dense) | passkey (depth 50 %) "
           "| TTFT sparse s | TTFT dense s (projected) | speedup | attention speedup (layers timed densely) "
           "| attention speedup, all layers (dense projected) | estimation / sparse attention | mean density "
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
        all_layers = len(r["layers"]) * sum(dense) / len(dense) / sum(x["sparse_s"] for x in r["layers"])
        temperature = r.get("dca_temperature", "position")  # rows without it ran when position was the default
        out.append(f"| {r.get('prompt', 'passkey')} | {r['length']} | {r['prompt_tokens']} | {budgets} | {temperature} | "
                   f"{r.get('mass') or '-'}{' (union)' if r.get('mass_union') else ''} | {_rows_per_estimate(r)} | {r.get('kernel', 'per span')}"
                   f"{', in ' + r['dtype'] if r.get('dtype', 'fp32') != 'fp32' else ''} | "
                   f"{fallback} | {verdict} | {r['ttft_sparse_s']:.0f} | {r['ttft_dense_projected_s']:.0f} | "
                   f"{r['ttft_speedup_projected']:.2f}x | {r['attention_speedup']:.2f}x ({timed_s}) | {all_layers:.2f}x | "
                   f"{100 * r['estimate_share']:.1f} % | {sum(dens) / len(dens):.3f} | {sum(rec) / len(rec):.4f} |")
    return out


def _rows_per_estimate(r: dict) -> str:
    chunk = r.get("chunk", 16384)
    span = r.get("estimate_span") or chunk  # rows without it ran with one estimate per chunk
    return f"{chunk} ({min(span, chunk)})"


def _budgets(r: dict) -> str:
    window = f", slashes in windows of {r['slash_window']} (budget in keys)" if r.get("slash_window") else ""
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
    return (out + sparse_kernel_section() + searched_config_section() + sparse_smollm2() + sparse_threshold_section()
            + sparse_density_section())


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
        out += [f"### Searched budgets (`{os.path.relpath(path, ROOT)}`)", "",
                "`megactx sparse search EVAL --length 32000 --text TORCH_SOURCE --out FILE`, where TORCH_SOURCE is the "
                "installed torch package's Python source concatenated in path order (`find .../site-packages/torch "
                "-name '*.py' | LC_ALL=C sort | xargs cat`): real code, but not the perplexity document. Each head "
                "takes the cheapest of MInference's candidates whose recall on the last 256 rows reaches 0.95, else "
                "the best one. Rows 'searched' above use it through `--sparse-config FILE`.", "",
                f"- heads: {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}",
                f"- recall at 32000 tokens (mean per layer): {min(means):.3f} to {max(means):.3f}; worst head "
                f"{worst:.3f}", ""]
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


def sparse_density_section() -> list[str]:
    from sparse_density import density_table  # the benchmark's own table (it imports torch: only when needed)
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", "sparse_density_*.json"))):
        d = json.load(open(path))
        out += [f"### Planned density by tile and mass cut-off ({d['model']}, {d['prompt_tokens']}-token passkey prompt)",
                "", f"`python benchmarks/sparse_density.py --length {d['length']}`: the plans the estimates of one "
                "prefill give at each setting (share of causal pairs computed, mean over layers), per prefill piece "
                "(its last key). Default budgets; the engine's tile is 256 rows with span merging.", "",
                ] + density_table(d["rows"])
        out.append("")
    return out


def sparse_kernel_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_kernel.json")
    if not os.path.exists(path):
        return []
    d = json.load(open(path))
    out = ["### The kernel's calls on synthetic plans", "",
           f"`python benchmarks/sparse_kernel.py`: one {d['rows_per_piece']}-row prefill piece at {d['keys']} keys "
           "(14 heads, 2 KV heads, dim 64, 256-row blocks), per head the 100 nearest diagonals, slash bands, single "
           "scattered slashes and 1000 verticals; the same plan computed each way, alternating, best of "
           f"{d['repeat']}, {d['threads']} threads. 'per span' is one flash call per span (the kernel before); "
           "'gathered' gathers spans under 2048 keys with the columns into one call per block; 'tiled' computes "
           "the part of a span four consecutive blocks share once for their 1024 rows; 'exact diagonals' is "
           "tiled + gathered on the plan `--sparse-exact-diagonals` makes, where an isolated slash is one key per "
           "row instead of a 256-key span: a subset of the other plan, with its own density.", "",
           "| pattern | planned density | way | seconds | speedup vs dense | cost per computed pair vs dense |",
           "|---|---:|---|---:|---:|---:|"]
    out += [f"| {r['pattern']} | {r['density']:.3f} | {r['way']} | {r['seconds']:.2f} | {r['speedup_vs_dense']:.2f}x | "
            f"{r['cost_per_pair_vs_dense']:.2f} |" for r in d["rows"]]
    return out + [""]
