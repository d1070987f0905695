"""`megactx sparse search MODEL --length N` and `megactx sparse search MODEL --refine --length N --threshold R`."""
from __future__ import annotations

import os

from megactx.commands.flags import add_engine_flags, engine_config, model_arg
from megactx.errors import MegactxError


def add_parser(sub) -> None:
    sp = sub.add_parser("sparse", help="sparse prefill tools").add_subparsers(dest="sparse_cmd", required=True)
    s = sp.add_parser("search", help="search each head's sparse pattern by attention recall; write the JSON")
    add_engine_flags(s, positional_model=True)
    s.add_argument("--length", type=int, required=True, help="calibration length in tokens")
    s.add_argument("--text", default=None, help="calibration text file (default: the standard library's source)")
    s.add_argument("--out", default=None, help="output JSON (default: sparse_attention_config.json beside the model)")
    s.add_argument("--rows", type=int, default=256, help="search: last rows whose full attention is the reference")
    s.add_argument("--last-q", type=int, default=64, help="search: last queries that estimate a candidate")
    s.add_argument("--target", type=float, default=0.95, help="search: recall a candidate must reach")
    s.add_argument("--refine", action="store_true", help="raise the budgets of heads below --threshold recall")
    s.add_argument("--threshold", type=float, default=0.9, help="refine: recall exp(lse_sparse - lse_full) to reach")
    s.add_argument("--step", type=int, default=2048, help="refine: verticals and slashes added per pass")
    s.add_argument("--passes", type=int, default=1, help="refine: passes (stops early when every head passes)")
    s.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from tqdm import tqdm

    from megactx import LLM
    from megactx.attention.sparse.patterns import CONFIG_NAME
    from megactx.eval.ppl import document_ids
    from megactx.loader import default_model_path
    from megactx.tools.sparse_search import run_refine, run_search
    if args.length < 128:
        raise MegactxError(f"--length {args.length} is too short for a search; use at least 128 tokens")
    if not 0 < args.target <= 1 or not 0 < args.threshold <= 1:
        raise MegactxError("--target and --threshold are recalls in (0, 1]")
    model = model_arg(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(model or default_model_path())), CONFIG_NAME)
    kw = {"max_model_len": max(args.max_model_len or 0, args.length + 8), "max_num_seqs": 1}
    if args.refine:
        # refinement measures the budgets themselves: planned from them, never replaced by the dense fallback
        kw.update(sparse=True, sparse_threshold=0, sparse_max_density=1.0, sparse_estimate="vertical-slash")

        def make(budgets):
            return LLM(config=engine_config(args, **kw, sparse_config=budgets))
        first = make(args.sparse_config)
        ids = document_ids(first.tokenizer, args.length, args.text)
        del first
        bar = tqdm(total=args.passes, desc="refine passes", unit="pass")
        run_refine(make, ids, args.sparse_config, out, args.threshold, args.step, args.passes,
                   on_pass=lambda p, raised: (bar.update(1), bar.set_postfix(raised=raised)))
        bar.close()
    else:
        from megactx.engine.llm_engine import derived_max_len
        from megactx.loader import open_model
        trained = derived_max_len(open_model(model).config)
        if args.length >= trained:  # one generated token beyond the document must fit
            raise MegactxError(f"--length {args.length}: the search measures dense attention within the model's "
                               f"context length {trained}; use --length {trained - 1} or less")
        kw.update(sparse=False, max_model_len=args.length + 1)
        llm = LLM(config=engine_config(args, **kw))
        ids = document_ids(llm.tokenizer, args.length, args.text)
        n_layers = llm.engine.model_config.num_hidden_layers
        bar = tqdm(total=n_layers, desc="layers", unit="layer")
        layers = run_search(llm, ids, out, rows=args.rows, last_q=args.last_q, target=args.target,
                            on_layer=lambda li: bar.update(1))
        bar.close()
        kinds = {}
        for layer in layers:
            for p in layer.values():
                kinds[p.kind] = kinds.get(p.kind, 0) + 1
        print(", ".join(f"{k}: {v} heads" for k, v in sorted(kinds.items())))
    print(f"wrote {out}")
    return 0
