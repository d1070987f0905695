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
                   f"{', in ' + r['dtype'] if r.get('dtype', 'fp32') != 'fp32' else ''}"
                   f"{', on an ' + r['cpu'] + ' CPU' if r.get('cpu') else ''} | "
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
           "| length | CPU | dtype | TTFT dense DCA s | TTFT sparse s | speedup | peak RSS MB dense / sparse |",
           "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "sparse" not in r["mode"]:
            continue
        dense = next((d for d in rows if d["mode"] == "dca" and d["length"] == r["length"]
                      and d["dtype"] == r["dtype"] and d.get("cpu") == r.get("cpu")), None)
        if dense:
            out.append(f"| {r['length']} | {r.get('cpu', '-')} | {r['dtype']} | {dense['ttft_s']:.0f} | {r['ttft_s']:.0f} | "
                       f"{dense['ttft_s'] / r['ttft_s']:.2f}x | {dense['peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} |")
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


def estimate_queries_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_estimate_queries.json")
    if not os.path.exists(path):
        return []
    from sparse_estimate_queries import table  # the benchmark's own table (it imports torch: only when needed)
    d = json.load(open(path))
    first = d["layers"][0]
    return [f"### Which queries estimate the pattern ({d['model']})", "",
            f"`python benchmarks/sparse_estimate_queries.py --model EVAL --length {d['length']}`: one prefill of "
            f"the perplexity document in {d['chunk']}-token chunks; at the last piece ({first['rows']} rows, "
            f"{first['keys']} keys) of each of the {d['summary'][0]['layers']} layers the pattern is "
            "estimated from the piece's last 64 queries (the engine) or from 64 spread evenly over it, planned, "
            "computed and compared with the dense attention of the same rows (default budgets; means over "
            "layers). The relative output error is |o_sparse - o_dense| / |o_dense| per row and head.", ""
            ] + table(d["summary"]) + [
            "", "Spread queries plan more pairs and lose less: at mass 0.9 they compute more than the last 64 "
            "at 0.95 for less error, so neither set is both sparser and more accurate at these cut-offs, and "
            "the engine keeps MInference's last queries. In this 6144-row piece the rows far from the last queries "
            "(the first quarter) keep the recall of the nearest ones.", ""]


def oracle_section() -> list[str]:
    out = []
    for name in sorted(f for f in os.listdir(os.path.join(HERE, "results")) if f.startswith("sparse_oracle_")):
        from sparse_oracle import tables  # the benchmark's own tables (it imports torch: only when needed)
        d = json.load(open(os.path.join(HERE, "results", name)))
        first = d["layers"][0]
        ids = [r["layer"] for r in d["layers"]]
        some = ids != list(range(len(ids)))  # measured on the layers given by --layers
        out += [f"### How sparse the attention is: the engine's plans against an oracle ({d['model']}, "
                f"{d['length']} tokens)", "",
                f"`python benchmarks/sparse_oracle.py --model EVAL --length {d['length']}"
                + (f" --layers {','.join(map(str, ids))}" if some else "") + "`: one prefill of the "
                f"perplexity document in {d['chunk']}-token chunks; at the piece of rows "
                f"{first['keys'] - first['rows']}-{first['keys']} of each of {'these' if some else 'the'} {len(ids)} layers the exact attention "
                "probabilities give the fewest (query, key) pairs that keep a mean recall (the attention mass the "
                "computed keys carry, mean over rows and heads), greedy over the layer, at four granularities: "
                "each row its own keys (64 rows sampled), each 256-row block its own keys, 256-row blocks of "
                "64-key groups, 64-row blocks of 64-key groups. The engine's plan (its last 64 queries, default "
                "budgets) is computed by the sparse kernel at each mass cut-off, and the oracle's density is read "
                "at the recall the engine reached, layer by layer (means over layers). The last table: block "
                "estimates at 256-row blocks of 64-key groups, each head and block keeping its best groups until a "
                "cut-off of their estimated mass ('exact': the true masses, the best such a cut-off can do; "
                "'sampled': the true masses of every 16th row; 'pooled': every row scored against each group's "
                "mean key), their density read at the engine's recall (where even their lowest cut-off, 0.8, keeps "
                "more, the density there: an upper bound), over the layers where every estimate reaches it.", ""] + tables(d["summary"]) + [""]
        e = next((e for e in d["summary"]["engine"] if e["mass"] == 0.95), None)
        if e:
            share = {g: e["oracle"][g] / e["density"] for g in e["oracle"]}
            out += [f"At the recall the engine keeps with mass 0.95 ({e['recall']:.3f}), an oracle computes "
                    f"{share['256 x 64']:.2f} of its pairs in 256-row blocks of 64-key groups, {share['256 x 1']:.2f} "
                    f"with any keys per 256-row block and {share['per row']:.2f} with any keys per row: the attention "
                    "is sparse per row, but the keys a row needs are scattered and differ from row to row, so "
                    "the columns and diagonals the last queries see cover them only in part.", ""]
    return out


def block_plans_section() -> list[str]:
    path = os.path.join(HERE, "results", "sparse_block_plans.json")
    if not os.path.exists(path):
        return []
    from sparse_block_plans import table  # the benchmark's own table (it imports torch: only when needed)
    d = json.load(open(path))
    layers = ",".join(str(x) for x in sorted({r["layer"] for r in d["rows"]}))
    return [f"### Pooled block plans in the kernel ({d['model']}, {d['length']} tokens)", "",
            f"`python benchmarks/sparse_block_plans.py --model EVAL --length {d['length']} --layers {layers}`: "
            f"the same prefill as above; at the last piece of each layer the dense attention, the engine's "
            "estimate and plan (mass 0.95) and the pooled block plan at three cut-offs, each plan computed by the "
            f"sparse kernel, best of {d['repeat']}, {d['threads']} threads, side by side in one process.", ""
            ] + table(d["rows"]) + [""]


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


# BENCHMARKS.md "Known gaps": what the sparse prefill measurements above show
SPARSE_GAPS = [
    "- Sparse prefill with the default budgets (1000 verticals, 6096 slashes per head) computes 46-84 % of the "
    "causal pairs at 64K on both a passkey prompt and natural text, so it is only 1.1x-1.3x faster than dense. "
    "The cause is the budgets more than the tile. Planned from one prefill's estimates at 32K "
    "(`benchmarks/sparse_density.py`, piece ending at 30720 keys), 256-row tiles compute 0.73 of the pairs, "
    "64-row tiles without span merging 0.59, and the mass cut-off 0.95 with 256-row tiles 0.41. Smaller "
    "tiles also run the flash kernel less efficiently, so the levers are smaller budgets (`megactx sparse "
    "search`) and the mass cut-off. At densities above ~0.7 the sparse kernel is slower than "
    "dense attention (0.47x at 32K, rows marked 'never'): chunks planned denser than `--sparse-max-density` "
    "(default 0.6) are now computed densely.",
    "- `--sparse-mass 0.95` cuts each head's budget to the indices that carry 95 % of its estimated attention: "
    "on SmolLM2 at 16K density fell from 0.87 to 0.33 and attention became 1.70x faster than dense (0.29x "
    "without it), with mean recall 0.93 instead of 0.97. On the 0.5B model at 64K (passkey prompt) attention "
    "became 2.35x faster than dense (1.1x without it), TTFT 1.71x the projected dense, recall 0.81-0.97 on the "
    "timed layers, passkey correct; at 128K attention 2.77x, TTFT 2.82x the projected dense (6197 -> 2197 s), "
    "estimation 8.1 %, passkey correct. Perplexity at 64K with it: 1.0087x dense DCA over the document but "
    "1.046x in the worst 4K bucket, so it is off by default.",
    "- Where sparse perplexity is lost: with mass 0.95 the two buckets above 1.03 are 49152-57344, the first "
    "8K rows of the last 16K prefill chunk; the chunk's last 8K rows are within 1.02. The searched budgets' "
    "worst buckets lie there too. A chunk's pattern is estimated from its last 64 queries, and its first rows "
    "are the farthest from them. With 8K prefill chunks (`--max-num-batched-tokens 8192`) the same mass cut-off "
    "is within 3 % in every bucket (worst 1.025x, whole document 1.0063x). So a chunk is now planned in parts "
    "of at most `--sparse-estimate-span` rows (default 8192), each from its own last queries: a 16K chunk "
    "in two 8K parts computes exactly what two 8K chunks do (tests compare the plans). The price, with mass "
    "0.95 and temperature none: at 64K (8K chunks) TTFT 1.40x the projected dense (832 vs 1167 s), attention "
    "1.59x on 7 timed layers, density 0.43, estimation 7.4 %; at 128K (16K chunks, 8K parts) TTFT 2.09x "
    "(1972 vs 4126 s), attention 2.25x on layers 4, 16, 23 (2.74x over all layers against their dense mean), "
    "density 0.30, estimation 9.7 %, passkey correct. The 16K-estimate rows above ran with temperature "
    "`position` on a busier machine (a dense layer took 170 s at 128K then, 150 s now): the sparse "
    "attention itself took 1372 s then and 1313 s now, so the finer estimate cost no attention time at 128K, "
    "while its ratio against dense is not comparable across the two runs. Measured back to back at 64K "
    "(temperature none): one estimate per 16K chunk gave TTFT 1.51x, attention 1.90x, estimation 5.1 %; "
    "8K estimates 1.40x, 1.59x, 7.4 %: the finer estimate costs about 16 % of the attention speed. Perplexity with the default "
    "budgets and 8K parts (the new default): worst bucket 1.004x dense DCA, whole document 1.0001x (1.010x "
    "worst with 16K estimates and temperature position).",
    "- Kernel calls: a call over a few hundred keys runs at half the flash kernel's speed or less, and "
    "scattered slashes make many such spans; 256-row calls use the kernel's 64-row query tiles, 1024-row "
    "calls its 256-row tiles (0.66-0.70 vs 0.84-0.87 Gpair/s). The kernel now gathers each block's spans "
    "under 2048 keys with its columns into one call and computes the part of a span four consecutive "
    "blocks share once for their 1024 rows (column 'kernel calls'). Same plans, same recall to four "
    "digits; at 64K with mass 0.95 and 8K chunks TTFT went from 1.40x to 1.64x the projected dense and "
    "attention from 1.59x to 2.07x on the timed layers (2.08x over all layers). Passkey at 128K with this "
    "setting: depths 0, 25, 50, 75 and 100 correct. `--sparse-exact-diagonals` (isolated slashes one "
    "key per row instead of a 256-key span) halves the pairs of synthetic plans with scattered slashes, but "
    "on this run it lowered the density only from 0.425 to 0.410 (recall 0.9220 to 0.9201) and was no faster "
    "(TTFT 1.59x, attention 2.03x): the real plans are mostly bands and columns.",
    "- At 128K on the tiled kernel (mass 0.95, 8K parts): TTFT 2.40x the projected dense (1630 vs 3917 s; "
    "2.09x on the per-span kernel), attention 2.58x on layers 4, 16, 23 (3.25x over all layers against their "
    "dense mean), density 0.297, recall 0.871, estimation 9.9 %, passkey correct. Still short of 3x TTFT and "
    "5x attention. `--sparse-mass-union` (slashes cut on the attention the verticals leave) was no help at "
    "64K: density 0.418 instead of 0.425, mean recall 0.897 instead of 0.922 (layer 0: 0.68 instead of "
    "0.82), because columns next to the estimating queries count as covered for them but serve no other row.",
    "- bf16 (`--dtype bf16`, which before this fix still computed in fp32): this machine has AMX tiles "
    "(lscpu: amx_bf16, amx_tile), which DESIGN.md 4 says it lacks. A 2048x2048 bf16 matmul ran at 504 "
    "GFLOP/s on one thread against 120 in fp32, and the CPU flash kernel 2.0-2.8x faster in bf16 at every "
    "call shape the sparse kernel makes (64-1024 rows, 256-16384 keys). Dense prefill of the 0.5B model: "
    "4.0x at 4K and 3.4x at 16K (table 'dtype_eval'), ahead of transformers in bf16. But the sparse "
    "prefill barely gains: at 64K in bf16 (mass 0.95, 8K chunks) dense attention took 13.7 s a layer "
    "instead of 35-40 s, while the sparse kernel took 313 s in all instead of 407 s in fp32 (estimation 51 s instead of 33), so sparse is "
    "0.91x dense's attention time (TTFT 454 vs 418 s projected dense), with the same density (0.425) and "
    "recall (0.9215). Three causes, found since. (1) The kernel merged each query block's parts on its own, a "
    "dozen small ops per block and head, which cost more than the flash calls at low density; it now merges "
    "a head's block and tile parts into two full-height buffers and everything once per head. On pieces "
    "captured from a 32K prefill (8192 rows, 24576 keys; old and new kernel alternating in one process, "
    "best of 3): 0.77 -> 0.51 s and 0.49 -> 0.33 s in bf16 (dense 1.05 and 0.96 s), 0.96 -> 0.74 s and "
    "0.71 -> 0.56 s in fp32 (densities 0.13 and 0.08); 0.93 -> 0.77 s and 1.11 -> 0.90 s in bf16 at "
    "densities 0.38 and 0.5 (dense 0.96 and 1.04 s). At 64K in bf16 (mass 0.95, 8K chunks) the sparse "
    "attention then took 203 s instead of 313 s: TTFT 317 s vs 359 s projected dense (1.13x), attention "
    "1.23x on the timed layers. (2) Small flash calls lose more in bf16: on the 0.38-density piece its calls "
    "ran at 0.9-1.5 Gpair/s against dense attention's 2.45 (40-60 %), in fp32 at 0.43-0.63 against 0.73 "
    "(60-85 %). (3) The estimate is computed in fp32 either way (0.45 s a layer at 32K in both), so its share "
    "of the sparse time doubles in bf16 (20.7 % at 64K). The fp32 64K run with the per-head merge gave TTFT "
    "1.56x and attention 1.95x, but on a slower machine than the earlier row (a dense layer took 39 s, not "
    "35 s); the side-by-side pieces above are the comparison. The bf16 row in the table is a rerun after the "
    "estimate started to keep its probabilities buffer across estimates (`estimate.Workspace`): TTFT 277 vs "
    "321 s projected dense (1.16x), attention 1.28x, estimation 31.8 s, 17.0 % of the sparse attention "
    "(42 s and 20.7 % before). This machine was faster that hour (a dense layer took 11.0 s, not 13.7 s), so "
    "part of the drop is the machine; alternating on synthetic inputs the buffer saved 5-13 % of an estimate. "
    "The row now in the table ran after the estimate went through passes of 32 MB instead of 128 MB (25-33 % "
    "less time per estimate on synthetic inputs, alternating) on a slower hour (a dense layer took 12.7 s): "
    "TTFT 344 vs 389 s projected dense (1.13x), attention 1.23x, estimation 32.2 s, 14.1 % of the sparse "
    "attention; measured end to end then, bf16 at 64K gave 1.11x. The 256-row bf16 row in the table is the "
    "rerun of the next bullet.",
    "- bf16, later: the estimate's softmax became one ATen pass per row (in place) instead of five passes over "
    "the buffer, bf16 keys are copied into a kept fp32 buffer, and the plan fills its gaps on the runs' ends and "
    "builds each head's spans and columns with whole-tensor ops (6-8 ms instead of 12-18 ms on the captured "
    "24K-key pieces; the old plan is kept as the tests' reference). At 64K in bf16 (mass 0.95, 8K chunks) the "
    "estimate then took 0.8-0.9 s a layer instead of 1.2-1.4 s: 20.5 s in all, 10.6 % of the sparse attention "
    "(TTFT 280 vs 359 s projected dense, 1.28x; attention 1.49x); in fp32 (the 64K row with 8K chunks and the "
    "per-head merge) 21.5 s, 4.9 % (42.9 s and 9.0 % in the run it replaced, where a dense layer took 39.2 s, "
    "not 37.3 s): TTFT 1.66x (662 vs 1099 s), attention 2.17x. In bf16 the sparse attention itself took 194 s "
    "instead of 229 s although the kernel had not changed; a dense layer took 12.2 s instead of 12.7 s, so "
    "the machine explains 4 % of it. Query blocks of 512 rows are now the default in bf16 and fp16 (256 in "
    "fp32): a taller block plans a superset of the keys, but on the captured pieces (the same estimate planned "
    "both ways, alternating, best of 3) it was 7-19 % faster in bf16 and 1-14 % slower in fp32, and 1024 rows "
    "were no faster than 512. The next run, with 512-row blocks: TTFT 268 vs 354 s projected dense (1.32x), "
    "attention 1.56x on the timed layers, sparse attention 181 s, recall slightly higher (a superset), 49 "
    "instead of 41 chunks dense, estimation 11.3 % (the same seconds against less attention). Perplexity at "
    "64K in bf16 with these settings (`dca-sparse-mass-chunk8k-bf16`): worst 4K bucket 1.014x dense DCA in bf16, "
    "whole document 1.0024x (fp32 with 256-row blocks: 1.025x and 1.0063x); dense DCA in bf16 is within 0.2 % "
    "of fp32 in every bucket. At 128K in bf16 (16K chunks, 8K parts, 512-row blocks; the first bf16 run at this "
    "length): TTFT 604 vs 1120 s projected dense (1.85x), attention 1.93x on layers 4, 16, 23 (2.28x over all "
    "layers against their dense mean), density 0.357, estimation 51.8 s = 11.7 %, passkey correct; fp32 took "
    "1421 s sparse. Profiled on a "
    "captured piece, flash calls are 77 % of the kernel's time; its 512-row calls run at 61-68 % of dense "
    "attention's pair rate and its 2048-row tile calls at 75-86 %. End to end (table 'Time to first token, "
    "both sides measured', rerun): 331 vs 238 s, 1.39x (1.11x before: 361 vs 324 s); fp32 rerun after the "
    "same changes: 949 vs 527 s, 1.80x (1.84x before: 1040 vs 566 s, on a slower hour for the dense side).",
    "- Peak memory in bf16: sparse prefill at 64K peaked at 4709 MB against 2778 MB dense (fp32: 3978 vs 3845). "
    "Measured at 16K in bf16 (threshold 0, one prefill per process): 3277-3542 MB with glibc's defaults in "
    "four runs (30 s); with a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_`) of 128 KB, 1 MB or 4 MB "
    "2419-2426 MB (33-40 s), of 16 MB 3341 MB (30 s); `MALLOC_ARENA_MAX=1` 3329 MB; `malloc_trim(0)` after "
    "every sparse chunk 2458 MB (31.7-33.1 s against 29.6-30.2 s). So the excess is glibc's heap "
    "fragmented by freed blocks of 4-16 MB, which its growing mmap threshold sends to the heap; a fresh fp32 "
    "copy of the keys per estimate was one such block, and keeping it did not change the peak. Every fix "
    "measured costs 5-30 % of the time, so none is applied.",
    "- The refined budgets (the searched ones after one refine pass at 64K, section below) are as fast as the "
    "default budgets with the mass cut-off, not faster: at 64K (16K chunks, 8K parts) TTFT 1.61x the projected "
    "dense (713 vs 1148 s), attention 1.97x on the timed layers, density 0.47, estimation 6.5 %, passkey "
    "correct; their perplexity is within 3 % but for one bucket (1.032x).",
    "- The searched budgets (`megactx sparse search`, 32000 tokens of torch's source) are fast but lose "
    "accuracy. At 128K: TTFT 3.38x the projected dense (1388 vs 4689 s), attention 4.57x on the timed "
    "layers 4, 16, 23 (the two densest of the searched plan among them; 5.80x over all 24 layers against "
    "their dense mean), estimation 10.2 %, passkey correct. At 64K: TTFT 2.25x, attention 3.50x (3.61x over all "
    "layers), estimation 6.7 % (13.1 % before the block-sparse plan was vectorised and the estimate went "
    "through a reused buffer; the 128K run had the first change, not the second). But recall on the timed "
    "layers is "
    "0.61-0.77 at 128K, and perplexity at 64K is 1.020x dense DCA over the document with its worst 4K "
    "bucket at 1.058x (four buckets above 1.03): not within 3 % per bucket, so they are not the default. "
    "Planned in 8K parts they are worse, not better: worst bucket 1.084x, whole document 1.027x, so their "
    "loss is in the budgets themselves, not in the rows far from the estimating queries. "
    "The default budgets with `--sparse-mass 0.95` keep a mean recall of 0.91-0.92 but reach only "
    "2.8x TTFT at 128K.",
    "- `--sparse-slash-window 128` (slashes chosen in windows of 128 diagonals, the 6096 slash budget counted "
    "in keys a query row computes at block granularity, not in diagonals), with mass 0.95: on pieces captured "
    "from a 32K bf16 prefill (8192 rows, 24576 keys, computed in fp32) the density of layer 16 fell from 0.49 "
    "to 0.20 and of layer 2 from 0.38 to 0.16 (kernel 1.9 -> 1.0 s and 1.7 -> 0.9 s; dense 3.0 s), layers 0 "
    "and 12 from 0.126 to 0.085 and 0.082 to 0.055. But the recall of layer 16 fell from 0.991 to 0.886 (worst "
    "head 0.96 -> 0.54), and perplexity at 64K failed: worst bucket 1.180x dense DCA (49152-53248), whole "
    "document 1.031x, while every bucket before 49152 stayed within 1.02x. Top-k diagonals at block "
    "granularity spread over most of the history, and the keys they cover by accident carry attention the "
    "model needs at long range (and at 64K top-k planned layers 20-23 dense enough to fall back to dense "
    "attention in 5-9 of 10 chunks, where windows keep them sparse). Windows cut only by the mass, with no key "
    "cap (`--sparse-config benchmarks/results/uncapped_slash_budgets.json`: 1000 verticals, 10^6 slash keys per "
    "head), kept recall 0.965 on layer 16 at density 0.33 (top-k: 0.991 at 0.49) and failed perplexity too: "
    "worst bucket 1.108x (57344-61440), whole document 1.025x. So the window is off by default.",
    "- At 128K with the per-head merge (fp32, mass 0.95, 8K parts): TTFT 2.15x the projected dense (2088 vs "
    "4480 s), attention 2.42x on layers 4, 16, 23, estimation 10.7 %, passkey correct; the same plans as the "
    "2.40x row (density 0.297). This run was on a slower machine (a dense layer took 161 s, not 145 s), and "
    "the per-head merge does not change fp32 at this length: on synthetic plans at 131072 keys (8192 rows, "
    "old and new kernel alternating, best of 3) it took 6.65 s against 6.30 s with scattered slashes and "
    "5.68 s against 6.04 s with bands (dense 21.6 and 22.7 s). Profiled there, flash calls are 70 % of the "
    "kernel's time at 80-90 % of the dense pair rate, and gathering keys 13 %: the remaining gain from the "
    "kernel is small; the density that perplexity allows is the limit. The row now in the table is a rerun "
    "after the estimate went through passes of 32 MB instead of 128 MB: TTFT 2.59x the projected dense (1421 "
    "vs 3676 s), attention 2.91x on layers 4, 16, 23 (3.47x over all layers against their dense mean), "
    "estimation 67 s, 7.1 % of the sparse attention (106 s and 9.9 % in the 2.40x row, where a dense layer "
    "took 144 s; 136 s in this run), density 0.297, passkey correct.",
    "- How far the estimate is from the best plan (sections 'How sparse the attention is' and 'Pooled block "
    "plans', 30K, fp32, AVX2): at the recall the engine keeps with mass 0.95 (0.972), an oracle that sees the "
    "exact attention needs 0.63 of the engine's pairs at the kernel's granularity (256-row blocks of 64-key "
    "groups), 0.34 with any keys per block and 0.14 with any keys per row. The attention is sparse per row but "
    "scattered: the keys differ from row to row, and even the oracle keeps layers 21-23 at 0.48-0.64 of the pairs "
    "at block granularity. A cheap block estimate (every row against each 64-key group's mean key) reaches the "
    "engine's recall with 0.313 instead of 0.384 of the pairs (23 layers), but its many short key ranges cost "
    "more per pair in the kernel: timed side by side on six layers (estimate and kernel, read at the engine's "
    "recall between cut-offs) it was 15-30 % faster on layers 15 and 13, about even on 5 and 18 and 6-20 % "
    "slower on 9 and 2. No estimate at this granularity reaches the density a 5x "
    "attention speed-up needs (about 0.18 at 1.1 times dense's cost per pair) at this recall on this model. "
    "At 64K it is different (the oracle run on layers 0, 4, 8, 12, 16, 20 and 23, piece 57344-61440, the end of "
    "the second DCA chunk): the engine's plans keep a mean recall of only 0.850 with mass 0.95 (0.76-0.94 by "
    "layer; 0.884 with the budgets alone, which plan 0.490 of the pairs), while an oracle at 256 x 64 reaches "
    "that recall with 0.069, and the pooled block estimate at its lowest cut-off (0.8) keeps more recall than the "
    "engine with mass 0.95 on five of the seven layers and within 0.005 on the other two (16, 20), with "
    "0.025-0.256 of the pairs where the engine plans 0.042-0.465 (layer 16: 0.158 against 0.423). "
    "Under DCA the last queries' columns and diagonals estimate the pattern of this piece poorly; a pooled "
    "block estimate is the lead to follow there (not yet timed in the kernel or checked on perplexity at this "
    "length).",
]
