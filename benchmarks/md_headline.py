"""BENCHMARKS.md: the headline results on one screen, each with the machine it ran on, read from
benchmarks/results; the full tables and the studies are in benchmarks/STUDIES.md (make_benchmarks_md.py)."""
from __future__ import annotations

import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
EVAL = "Qwen2.5-Coder-0.5B-Instruct (GGUF), trained to 32K"


def _load(name: str):
    return json.load(open(os.path.join(RESULTS, name)))


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(RESULTS, name)) if line.strip()]


def _sparse_row(length: int) -> dict:
    """The last sparse_attention.py row at `length` that timed every layer both ways."""
    rows = [r for r in _load("sparse_attention_eval.json")["rows"]
            if r["length"] == length and len(r["dense_layers_measured"]) == len(r["layers"])]
    return rows[-1]


def _ttft_pair(length: int) -> tuple[dict, dict]:
    """The last dense-DCA and default-sparse TTFT rows measured side by side in one run (adjacent rows)."""
    rows = [r for r in _jsonl("ttft_sparse_eval.jsonl") if r["length"] == length]
    for a, b in reversed(list(zip(rows, rows[1:]))):
        pair = {a["mode"]: a, b["mode"]: b}
        if set(pair) == {"dca", "dca+sparse-pooled"} and a.get("cpu") == b.get("cpu"):
            return pair["dca"], pair["dca+sparse-pooled"]
    raise LookupError(f"no side-by-side TTFT pair at {length}")


def _worst_bucket(sparse: str, dense: str) -> tuple[float, float]:
    a, b = _load(f"ppl/{sparse}")["buckets"], _load(f"ppl/{dense}")["buckets"]
    ratios = [x["ppl"] / y["ppl"] for x, y in zip(a, b)]
    whole = math.exp(sum(x["nll"] * x["tokens"] for x in a) / sum(x["tokens"] for x in a)) / math.exp(
        sum(y["nll"] * y["tokens"] for y in b) / sum(y["tokens"] for y in b))
    return max(ratios), whole


def _passkey(folder: str) -> list[dict]:
    return _load(f"{folder}/passkey_summary.json")["summary"]


def _cpu(flags: str) -> str:
    """'2 cores, AVX2 AVX512 AVX512-BF16' (or /proc/cpuinfo's names) -> 'AVX512 with BF16, no AMX'."""
    words = set(flags.lower().replace(",", " ").replace("-", "_").split())
    base = "AVX512" if words & {"avx512f", "avx512"} else "AVX2"
    extra = " with BF16" if "avx512_bf16" in words else ""
    return f"{base}{extra}, {'AMX' if words & {'amx_tile', 'amx'} else 'no AMX'}"


def _prefix_cache_rows() -> list[str]:
    """benchmarks/prefix_cache.py: the second question, a restart, concurrent questions, no sharing."""
    second, shared = _load("prefix_cache_second.json"), _load("prefix_cache_shared.json")
    first, again, disk = second["rows"]
    rows = [
        f"| Second question, {second['length'] // 1024}K document | TTFT **{again['ttft_s']:.1f} s** vs "
        f"{first['ttft_s']:.0f} s ({again['ttft_vs_first']:.1%}); after a restart, from disk: {disk['ttft_s']:.1f} s "
        f"({disk['ttft_vs_first']:.1%}) | DCA + sparse, fp32 | {_cpu(second['cpu'])} |",
        f"| {shared['concurrent']} questions at once, one {shared['shared_tokens'] // 1024}K document | "
        f"**{shared['on']['wall_s']:.0f} s** vs {shared['off']['wall_s']:.0f} s uncached, KV "
        f"{shared['kv_ratio']:.2f}x, {shared['same_answers']}/{shared['concurrent']} answers equal | fp32 "
        f"| {_cpu(shared['cpu'])} |"]
    if os.path.exists(os.path.join(RESULTS, "sparse_estimate_cost.json")):
        cost = _load("sparse_estimate_cost.json")
        top = cost["rows"][-1]
        rows.append(f"| Sparse estimate, {cost['chunk'] // 1024}K chunk at {top['keys'] // 1024}K keys, a layer | "
                    f"**{top['coarse_s']:.2f} s** coarse-to-fine vs {top['pooled_s']:.2f} s ({top['ratio']:.1f}x) | "
                    f"`--sparse-coarse-refine {cost['refine']}` | {_cpu(cost['cpu'])} |")
    if os.path.exists(os.path.join(RESULTS, "prefix_cache_random.json")):
        rnd = _load("prefix_cache_random.json")
        spread = max(rnd["on_s"] + rnd["off_s"]) / min(rnd["on_s"] + rnd["off_s"]) - 1
        rows.append(f"| Prompts that share nothing | {rnd['on_vs_off']:.2f}x the throughput without prefix caching "
                    f"(rounds vary {spread:.0%}: noise) | SmolLM2-135M, {rnd['prompts']} prompts of 256-1024 tokens, "
                    f"8 at a time | {_cpu(rnd['cpu'])} |")
    return rows


def _beyond_128k_rows() -> list[str]:
    """Passkey runs past 128K: results/passkey_eval_dca_sparse_linear_*, each with a run.json that gives the
    command, the CPU, the dtype and the peak RSS of the run."""
    rows = []
    for folder in sorted(f for f in os.listdir(RESULTS) if f.startswith("passkey_eval_dca_sparse_linear")):
        if not os.path.exists(os.path.join(RESULTS, folder, "run.json")):
            continue  # a run still going: its record comes when it ends
        run = _load(f"{folder}/run.json")
        cells = _jsonl(f"{folder}/passkey.jsonl")
        for length in sorted({c["length"] for c in cells}):
            mine = [c for c in cells if c["length"] == length]
            uncached = mine[0]["ttft_s"]  # the first cell of a length computes its whole prompt
            label = f"{length >> 20}M" if length % (1 << 20) == 0 else f"{length // 1024}K"
            rows.append(f"| Passkey at {label} | **{sum(c['correct'] for c in mine)}/{len(mine)}** depths; "
                        f"TTFT {uncached / 60:.0f} min a whole prompt; peak RSS {run['peak_rss_gb']:.1f} GB "
                        f"| DCA, {run['settings']}, {run['dtype']} | {_cpu(run['cpu'])} |")
    return rows


def _grammar_row() -> list[str]:
    if not os.path.exists(os.path.join(RESULTS, "grammar_overhead.json")):
        return []
    g = _load("grammar_overhead.json")
    rows = {(r["model"], r["library"]): r for r in g["rows"] if "error" not in r}
    chosen = [r for (m, lib), r in rows.items() if lib == "llguidance" and "qwen" in m]
    if not chosen:
        return []
    r = chosen[0]
    return [f"| Structured output (JSON schema), cost per token | **{r['per_token_ms_mean']:.2f} ms** mean "
            f"(p95 {r['per_token_ms_p95']:.2f} ms) on a {r['vocab'] // 1000}K-token vocabulary | llguidance, "
            f"`benchmarks/grammar_overhead.py` | {_cpu(g['cpu'])} |"]


def _clients_row() -> list[str]:
    """benchmarks/lm_eval_agreement.py: lm-eval through the server against lm-eval's transformers model."""
    if not os.path.exists(os.path.join(RESULTS, "lm_eval_agreement.json")):
        return []
    r = _load("lm_eval_agreement.json")
    served, local = r["megactx_local_completions"], r["transformers_hf"]
    return [f"| lm-eval multiple choice via the server | acc **{served['acc']:.3f}** vs {local['acc']:.3f} "
            f"(transformers); log-likelihoods within {r['max_abs_loglikelihood_diff']:g} | {r['documents']} "
            f"questions, SmolLM2 | {_cpu(r['cpu'])} |"]


def _parallel_rows() -> list[str]:
    """benchmarks/tensor_parallel.py: 2 ranks of 1 thread against 1 process of 2 threads, the longest prompt."""
    rows = []
    for kind in ("tensor", "context"):
        if not os.path.exists(os.path.join(RESULTS, f"{kind}_parallel.json")):
            continue
        t = _load(f"{kind}_parallel.json")
        length = max(r["length"] for r in t["measured"])
        one, two = (next(r for r in t["measured"] if r["length"] == length and r["ranks"] == n) for n in (1, 2))
        rows.append(f"| {kind.capitalize()} parallel, 2 ranks, {length:,} tokens | TTFT {two['ttft_s']:.0f} s vs "
                    f"{one['ttft_s']:.0f} s in one process; {two['comm_ms_per_prefill_chunk'] / 1000:.1f} s a 4K "
                    f"chunk in collectives | gloo, fp32 | {_cpu(t['cpu'])} |")
    return rows


def _decode_attention_row() -> list[str]:
    """benchmarks/decode_attention.py: one decode row over 1M keys, GQA packed against the kernel's per-head GQA."""
    if not os.path.exists(os.path.join(RESULTS, "decode_attention.json")):
        return []
    t = _load("decode_attention.json")
    r = next(r for r in t["rows"] if r["dtype"] == "bfloat16" and r["keys"] == max(x["keys"] for x in t["rows"]))
    return [f"| Decode attention over {r['keys'] // 1048576}M cached keys, one layer | **{r['speedup']}x** faster "
            f"({r['packed_ms']:.0f} ms against {r['per_head_ms']:.0f} ms) | query heads packed per KV head, bf16 "
            f"| {_cpu(t['cpu'])} |"]


def headline() -> list[str]:
    s128, s64 = _sparse_row(131072), _sparse_row(65536)
    dense64, sparse64 = _ttft_pair(65536)
    worst, whole = _worst_bucket("eval_dca-sparse-pooled-0.7.json", "eval_dca-none.json")
    passkey = {r["length"]: r for r in _passkey("passkey_eval_dca_sparse_pooled_0.7")}
    dtype = {(r["engine"], r["dtype"], r["length"]): r for r in _jsonl("ttft_dtype_eval.jsonl")}
    fp32, bf16 = dtype[("megactx", "fp32", 16384)], dtype[("megactx", "bf16", 16384)]
    engine = {(r["model"], r["engine"], r["metric"], r["length"]): r for r in _load("engine_eval.json")["rows"]}
    prefill16k = engine[("eval", "megactx", "prefill_tok_s", 16384)]
    serve = _load("serve_smollm2.json")
    streams = serve["eight_streams"]["decode_tok_s"] / serve["single_stream"]["decode_tok_s"]
    ruler = _load("ruler_eval/ruler_summary.json")
    lines = [
        "# Benchmarks", "",
        f"Measured on 2-core CPUs, no GPU, 2 threads, on the evaluation model ({EVAL}) unless a row says otherwise. "
        "The CPUs differ between machines (flags in the last column; rows measured before the flags were recorded "
        "say so); every ratio is of two runs made side by side "
        "in one session on one machine. Full tables, commands and the studies behind each choice: "
        "[benchmarks/STUDIES.md](benchmarks/STUDIES.md).", "",
        "| result | figure | setting | CPU |",
        "|---|---|---|---|",
        f"| Sparse prefill at 128K: attention time, all 24 layers | **{s128['attention_speedup']}x** faster than dense "
        f"DCA | DCA + pooled estimate (cut-off {s128['mass']}), {s128['dtype']}, both sides in one prefill "
        f"| {s128['cpu']}, no AMX |",
        f"| Time to first token at 128K | **{s128['ttft_sparse_s'] / 60:.0f} min** sparse, "
        f"{s128['ttft_speedup_projected']}x the projected dense DCA | as above; passkey "
        f"{'retrieved' if s128['passkey_correct'] else 'missed'} | {s128['cpu']}, no AMX |",
        f"| Time to first token at 64K | **{sparse64['ttft_s']:.0f} s** sparse against {dense64['ttft_s']:.0f} s dense "
        f"DCA ({dense64['ttft_s'] / sparse64['ttft_s']:.2f}x) | `megactx bench ttft --modes dca,dca+sparse-pooled`, "
        f"{sparse64['dtype']} | {sparse64['cpu']}, no AMX |",
        f"| Attention at 64K, all layers | {s64['attention_speedup']}x faster than dense DCA | as the 128K row "
        f"| {s64['cpu']}, no AMX |",
        f"| Passkey beyond the trained length | "
        + ", ".join(f"{r['length'] // 1024}K: {r['accuracy']:.0f} % of {r['cells']} depths" for r in passkey.values())
        + " | DCA + sparse prefill at the defaults, fp32 | AVX2 at 128K |",
        f"| Perplexity at 64K, sparse against dense DCA | worst 4K bucket **{worst:.3f}x**, whole document "
        f"{whole:.3f}x | the standard library's source, fp32 | AVX2 |",
        f"| bf16 against fp32 compute, 16K prefill | **{fp32['ttft_s'] / bf16['ttft_s']:.1f}x** faster "
        f"({bf16['ttft_s']:.0f} s against {fp32['ttft_s']:.0f} s) | `--dtype bf16` | AVX512 with AMX |",
        f"| Prefill against transformers, 16K | {prefill16k['ratio']:.2f}x transformers' tokens/s "
        f"({prefill16k['megactx']:.0f} tok/s) | fp32, same GGUF file | not recorded |",
        f"| Server, 8 concurrent streams | {streams:.1f}x one stream's decode rate | SmolLM2-135M, "
        f"`--packed-weights auto` | not recorded |",
        *_beyond_128k_rows(),
        *_prefix_cache_rows(),
        *_grammar_row(),
        *_clients_row(),
        *_parallel_rows(),
        *_decode_attention_row(),
        f"| RULER-11 at 4K | {ruler['avg']:.1f} (of 100), {ruler['samples']} samples a task | in range, fp32 | not recorded |",
        "",
        "## What each area measures", "",
        "- **Sparse prefill** (`benchmarks/sparse_attention.py`): one prefill of a passkey prompt; for every layer "
        "the engine's sparse probe times the sparse kernel and, on the same inputs, dense DCA attention, and reports "
        "the recall exp(lse_sparse - lse_dense). Dense TTFT beyond 64K is projected from those per-layer times.",
        "- **Time to first token** (`megactx bench ttft`): each engine and length in its own process, the same token "
        "ids, from submitting the prompt to the first token.",
        "- **Retrieval**: `megactx eval passkey` (Qwen2.5-1M's prompt) and `megactx eval ruler` (RULER's 11 "
        "synthetic tasks, generated offline; the essay haystack is a named substitute).",
        "- **Perplexity** (`megactx eval ppl`): one long document scored per 4K-position bucket; the sliding window "
        "and dense DCA are the references.",
        "- **Engine and server** (`benchmarks/engine_vs_transformers.py`, `benchmarks/serve_latency.py`): prefill, "
        "decode and memory against transformers; latency and throughput of `megactx serve` under concurrency.",
        "- **Prefix caching** (`benchmarks/prefix_cache.py`): time to first token of a first and a second question "
        "about one document, and of a third asked of a new engine that finds the document in `--kv-cache-dir`; "
        "concurrent questions and unrelated prompts with the cache on and off.", "",
        "Regenerate both files with `python benchmarks/make_benchmarks_md.py`.",
    ]
    return lines
