"""`megactx eval passkey | ruler`: argument parsing and the progress bar; the work is in passkey.py / ruler.py."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megactx.commands.flags import add_engine_flags, engine_config, env_value
from megactx.errors import MegactxError
from megactx.eval.results import parse_int_list

log = logging.getLogger("megactx")


def add_target_args(p: argparse.ArgumentParser) -> None:
    add_engine_flags(p)
    p.add_argument("--base-url", default=None, help="evaluate an OpenAI-compatible server instead of loading the model")
    p.add_argument("--api-key", default=env_value("--api-key"))
    p.add_argument("--served-model", default=None, help="model name on the server (default: its first /v1/models entry)")
    p.add_argument("--out", required=True, help="output folder (results are appended; a rerun resumes)")
    p.add_argument("--seed", type=int, default=0)


def _open(args, lengths: list[int], max_new: int):
    from megactx.eval.backends import open_backend
    if args.base_url:
        return open_backend(args.base_url, args.api_key, args.served_model)
    # one request at a time: the KV cache only needs one long sequence
    overrides = {"max_num_seqs": 1}
    if args.max_model_len is None:  # as long as the lengths need: within the model's context unless DCA extends it
        from megactx.engine.llm_engine import derived_max_len
        from megactx.loader import open_model
        need = max(lengths) + max_new
        beyond = getattr(args, "dca", False) or getattr(args, "allow_long_context", False)
        overrides["max_model_len"] = need if beyond else min(need, derived_max_len(open_model(args.model).config))
    return open_backend(config=engine_config(args, **overrides))


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True)


class PrefillBar:
    """on_prefill for long prompts: a second bar, in tokens, with tqdm's rate and time left (a 1M-token prompt
    computes for hours)."""
    MIN_TOKENS = 8192

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm
        if self.bar is None and total >= self.MIN_TOKENS and done < total:
            self.bar = tqdm(total=total, initial=done, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr,
                            dynamic_ncols=True, leave=False)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
                self.bar = None


def _machines(rows: list[dict]) -> dict:
    """The CPUs and compute dtypes the rows were measured with (rows from servers record none)."""
    return {key: sorted({r[key] for r in rows if key in r}) for key in ("cpu", "dtype")}


def cmd_passkey(args) -> int:
    from megactx.eval import passkey
    from megactx.eval.plots import passkey_heatmap
    lengths = parse_int_list(args.lengths, "--lengths")
    depths = parse_int_list(args.depths, "--depths", example="0,50,100 (percent)")
    if args.trials < 1:
        raise MegactxError("--trials must be at least 1")
    if any(d > 100 for d in depths):
        raise MegactxError("--depths are percentages from 0 (top) to 100 (bottom)")
    backend = _open(args, lengths, passkey.MAX_NEW_TOKENS)
    with _bar(len(lengths) * len(depths) * args.trials, "passkey") as bar:
        rows = passkey.run_passkey(backend, lengths, depths, args.trials, args.out, seed=args.seed,
                                   on_row=lambda row: bar.update(1), on_prefill=PrefillBar())
    wanted = [r for r in rows if r["length"] in lengths and r["depth"] in depths and r["trial"] < args.trials]
    table = passkey.summarize(wanted)  # printed: the cells asked for
    # the folder's heatmap and summary cover every row in it, so a run of a few more cells does not hide the rest
    png = passkey_heatmap(*passkey.accuracy_grid(rows), os.path.join(args.out, "passkey_heatmap.png"),
                          title=f"Passkey: {backend.name}")
    with open(os.path.join(args.out, "passkey_summary.json"), "w") as f:
        json.dump({"target": backend.name, "summary": passkey.summarize(rows), **_machines(rows)}, f, indent=2)
    print("| length | cells | accuracy % | key anywhere % | mean TTFT s | prefill tok/s |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['length']} | {t['cells']} | {t['accuracy']:.1f} | {t['substring']:.1f} | {t['mean_ttft_s']} "
              f"| {t['prefill_tok_s']} |")
    print(f"heatmap and summary of all {len(rows)} cells in {args.out}: {png}")
    return 0


def cmd_ruler(args) -> int:
    from megactx.eval import ruler
    from megactx.eval.ruler_tasks import ALL_TASKS
    tasks = ruler.parse_tasks(args.tasks)
    if args.samples < 1:
        raise MegactxError("--samples must be at least 1")
    lengths = parse_int_list(args.lengths, "--lengths")
    indices = parse_int_list(args.indices, "--indices", "0,3,5") if args.indices else list(range(args.samples))
    backend = _open(args, lengths, 0)
    with _bar(len(tasks) * len(lengths) * len(indices), "ruler") as bar:
        rows = ruler.run_ruler(backend, tasks, lengths, indices, args.out, seed=args.seed,
                               on_row=lambda row: bar.update(1), on_prefill=PrefillBar())
    wanted = [r for r in rows if r["index"] in indices]  # the folder may hold other samples from other runs
    summary = ruler.summarize(wanted, tasks, lengths)
    with open(os.path.join(args.out, "ruler_summary.json"), "w") as f:
        json.dump({"target": backend.name, "samples": len(indices),
                   "haystacks": {t: ALL_TASKS[t].haystack for t in tasks},
                   "tasks": summary["tasks"], "per_length": summary["per_length"], "avg": summary["avg"],
                   **_machines(wanted)}, f, indent=2)
    print(ruler.format_table(summary, lengths))
    return 0


def cmd_ppl(args) -> int:
    from megactx.eval.ppl import document_ids, perplexity_by_bucket
    if args.base_url:
        raise MegactxError("eval ppl runs in-process (it needs every position's logits): give --model, not --base-url")
    if args.length < 2 or args.bucket < 1:
        raise MegactxError("--length must be at least 2 tokens and --bucket at least 1")
    from megactx.llm import LLM
    max_len = args.max_model_len or args.window or args.length
    llm = LLM(config=engine_config(args, max_num_seqs=1, max_model_len=max_len))
    ids = document_ids(llm.tokenizer, args.length, args.text)
    scored = args.length - 1
    with _bar(scored, "ppl") as bar:
        bar.unit = "tok"
        rows = perplexity_by_bucket(llm.engine, ids, args.bucket, args.window, on_progress=bar.update)
    dca = llm.engine.dca
    setting = f"window {args.window}" if args.window else (
        f"DCA, temperature {dca.temperature}" if dca else "full context, plain RoPE")
    sparse = llm.engine.sparse
    sparse_applied = sparse is not None and max(len(ids) - 1 if not args.window else args.window, 0) > sparse.threshold
    if sparse_applied:
        setting += ", sparse prefill"
    dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    if dtype != "float32":  # runs compare only with runs of their compute dtype
        setting += f", {dtype}"
    # The file name only: a results file should not carry the local directory layout.
    model_name = os.path.basename(args.model.rstrip("/")) if args.model else None
    result = {"model": model_name, "length": args.length, "text": args.text or "python-stdlib",
              "setting": setting, "dca": llm.engine.dca.describe() if llm.engine.dca else None, "dtype": dtype,
              "sparse": sparse.describe() if sparse_applied else None, "buckets": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"perplexity, {setting}, {args.length} tokens of {result['text']}")
    print("| positions | tokens | perplexity |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['start']}-{r['end']} | {r['tokens']} | {r['ppl']:.3f} |")
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="long-context evaluation").add_subparsers(dest="eval", required=True)
    p = ev.add_parser("passkey", help="passkey retrieval over lengths x depths (heatmap, JSONL, summary)")
    add_target_args(p)
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--trials", type=int, default=1)
    p.set_defaults(func=cmd_passkey)
    r = ev.add_parser("ruler", help="RULER's synthetic tasks (RULER-11, offline)")
    add_target_args(r)
    r.add_argument("--tasks", default="all", help="all (RULER's 11), needles (RULER's 8 needle tasks and ours: niah_code, "
                   "niah_logs, niah_similar, niah_haystack_word), or a comma list: niah_single_1,...,vt,cwe,fwe")
    r.add_argument("--lengths", default="4096")
    r.add_argument("--samples", type=int, default=5)
    r.add_argument("--indices", default=None, help="run only these samples of each task and length, a comma list of "
                   "indices from 0 (default: the first --samples)")
    r.set_defaults(func=cmd_ruler)
    pp = ev.add_parser("ppl", help="perplexity of one long document per position bucket (in-process)")
    add_engine_flags(pp)
    pp.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    pp.add_argument("--length", type=int, required=True, help="tokens of the document to score")
    pp.add_argument("--text", default=None, help="a text file (default: the Python standard library's source)")
    pp.add_argument("--window", type=int, default=None, help="score with at most this many tokens of context")
    pp.add_argument("--bucket", type=int, default=4096, help="report every this many positions (default 4096)")
    pp.add_argument("--out", default=None, help="write the result as JSON here")
    pp.set_defaults(func=cmd_ppl)
