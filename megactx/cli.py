"""Command line: megactx serve | generate | chat | inspect | eval | bench | sparse.

Every engine flag can also be set with an environment variable MEGACTX_<FLAG> (e.g. MEGACTX_MAX_MODEL_LEN).
User errors print one line, `megactx: error: ...`, and exit with code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from megactx.errors import MegactxError
from megactx.sparse.config import ESTIMATE_CHOICES, POOLED_CUTOFF

log = logging.getLogger("megactx")


def env_default(flag: str, default=None, cast=str):
    value = os.environ.get("MEGACTX_" + flag.lstrip("-").replace("-", "_").upper())
    if value is None:
        return default
    try:
        return cast(value)
    except ValueError:
        raise MegactxError(f"environment variable MEGACTX_{flag.lstrip('-').replace('-', '_').upper()}={value!r} "
                           f"is not a valid {cast.__name__}") from None


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    if positional_model:
        p.add_argument("model_pos", nargs="?", metavar="MODEL", help="HF directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--model", default=env_default("--model"), help="HF directory or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--max-model-len", type=int, default=env_default("--max-model-len", None, int))
    p.add_argument("--max-num-seqs", type=int, default=env_default("--max-num-seqs", 16, int))
    p.add_argument("--max-num-batched-tokens", type=int, default=env_default("--max-num-batched-tokens", 4096, int),
                   help="tokens per engine step: the prefill chunk size (default 4096)")
    p.add_argument("--kv-cache-memory", default=env_default("--kv-cache-memory"),
                   help="KV cache size, e.g. 8GiB (default: enough for max-model-len x min(max-num-seqs, 4), <= 4GiB)")
    p.add_argument("--kv-cache-dtype", default=env_default("--kv-cache-dtype", "auto"), help="auto, fp32, bf16, fp16")
    p.add_argument("--dtype", default=env_default("--dtype", "fp32"),
                   help="compute dtype: fp32 (default), bf16 (several times faster prefill on CPUs with AMX, "
                        "several times slower on CPUs without AVX512-BF16), fp16")
    p.add_argument("--weight-dtype", default=env_default("--weight-dtype", "auto"),
                   help="storage of the weight matrices: auto (fp16 for quantized GGUF on CPU, else --dtype), fp32, fp16, bf16")
    p.add_argument("--packed-weights", default=env_default("--packed-weights", "auto"), choices=["auto", "on", "off"],
                   help="an extra fp32 copy of the weights packed for oneDNN, for batched decoding on CPU "
                        "(auto: when max-num-seqs > 1 and the copy takes at most 4 GiB)")
    p.add_argument("--device", default=env_default("--device", "cpu"))
    p.add_argument("--threads", type=int, default=env_default("--threads", None, int))
    add_dca_args(p)


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def add_dca_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dual Chunk Attention (run beyond the trained length without training)")
    g.add_argument("--dca", action="store_true", default=env_default("--dca", False, _flag),
                   help="turn DCA on (on by default for models whose config has dual_chunk_attention_config)")
    g.add_argument("--dca-chunk-size", type=int, default=env_default("--dca-chunk-size", None, int),
                   help="query position clamp (default: the trained length)")
    g.add_argument("--dca-local-size", type=int, default=env_default("--dca-local-size", None, int),
                   help="exact-position window into the previous chunk (default: chunk size / 16)")
    g.add_argument("--dca-original-max-position", type=int, default=env_default("--dca-original-max-position", None, int),
                   help="trained length used by the attention temperature (default: the trained length)")
    g.add_argument("--dca-temperature", default=env_default("--dca-temperature"),
                   choices=["position", "total", "none"],
                   help="YaRN-style attention temperature (default: position for a model whose config declares "
                        "dual_chunk_attention_config, as Qwen2.5-1M's recipe; none with --dca)")
    g.add_argument("--allow-long-context", action="store_true", default=env_default("--allow-long-context", False, _flag),
                   help="allow --max-model-len beyond the trained length with plain RoPE (ablations)")
    g = p.add_argument_group("Sparse prefill (MInference-style, for prompts above a threshold)")
    g.add_argument("--no-sparse", dest="sparse", action="store_false",
                   default=not env_default("--no-sparse", False, _flag), help="prefill every prompt densely")
    g.add_argument("--sparse-config", default=env_default("--sparse-config"),
                   help="per-head budgets JSON for the vertical-slash estimate (default: sparse_attention_config.json "
                        "beside the model, else 1000 verticals / 6096 slashes per head)")
    g.add_argument("--sparse-threshold", type=int, default=env_default("--sparse-threshold", 32768, int),
                   help="prompts longer than this many tokens are prefilled sparsely (default 32768)")
    g.add_argument("--sparse-last-q", type=int, default=env_default("--sparse-last-q", 64, int),
                   help="last queries of each prefill chunk that estimate the vertical-slash pattern (default 64)")
    g.add_argument("--sparse-mass", type=float, default=env_default("--sparse-mass", None, float),
                   help=f"the estimate's cut-off. Pooled: the share of each block's estimated attention its "
                        f"key groups keep (default {POOLED_CUTOFF}). Vertical-slash: per head, keep only the best "
                        "verticals and slashes (within the budgets) that reach this share, e.g. 0.95 (default: whole "
                        "budgets)")
    g.add_argument("--sparse-max-density", type=float, default=env_default("--sparse-max-density", 0.6, float),
                   help="a prefill chunk whose plan computes more than this share of the causal pairs is computed "
                        "densely, where sparse would be slower (default 0.6; 1 always runs the sparse kernel)")
    g.add_argument("--sparse-estimate-span", type=int, default=env_default("--sparse-estimate-span", 8192, int),
                   help="a prefill chunk longer than this many rows is planned in parts, each estimated from its own "
                        "last queries (default 8192; 0: one estimate per chunk)")
    g.add_argument("--sparse-block-size", type=int, default=env_default("--sparse-block-size", None, int),
                   help="query rows per sparse kernel block: taller blocks plan more keys in fewer, taller flash "
                        "calls (default 256 in fp32, 512 in bf16 and fp16)")
    g.add_argument("--sparse-exact-diagonals", action="store_true",
                   default=env_default("--sparse-exact-diagonals", False, _flag),
                   help="compute isolated slashes exactly, one key per query row, instead of a block-wide span of "
                        "keys (MInference's granularity): fewer pairs, a subset of the block-granular plan")
    g.add_argument("--sparse-mass-union", action="store_true",
                   default=env_default("--sparse-mass-union", False, _flag),
                   help="with --sparse-mass: count verticals and slashes together, choosing slashes only for the "
                        "attention the verticals leave (default: each list reaches the share on its own)")
    g.add_argument("--sparse-slash-window", type=int, default=env_default("--sparse-slash-window", 0, int),
                   help="choose slashes in windows of this many neighbouring diagonals and count a head's slash budget "
                        "in the keys a query row computes, not in diagonals (scattered diagonals each cost a "
                        "block-wide span); e.g. 128 (default 0: MInference's per-diagonal top-k)")
    g.add_argument("--sparse-estimate", choices=ESTIMATE_CHOICES,
                   default=env_default("--sparse-estimate", "auto"),
                   help="how the vertical_and_slash heads are planned: 'vertical-slash' (MInference: the budgets' "
                        "columns and diagonals from each chunk's last queries) or 'pooled' (every 4th query row "
                        "against each 64-key group's mean key; key groups kept up to --sparse-mass of each block's "
                        f"estimated attention, default {POOLED_CUTOFF}); default auto: vertical-slash with budgets "
                        "from a file or a slash option, else pooled")


def engine_kwargs(args) -> dict:
    return dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype, weight_dtype=args.weight_dtype,
                packed_weights=args.packed_weights, device=args.device,
                num_threads=args.threads, **dca_kwargs(args))


def dca_kwargs(args) -> dict:
    return dict(dca=args.dca, dca_chunk_size=args.dca_chunk_size, dca_local_size=args.dca_local_size,
                dca_original_max_position=args.dca_original_max_position, dca_temperature=args.dca_temperature,
                allow_long_context=args.allow_long_context, sparse=args.sparse, sparse_config=args.sparse_config,
                sparse_threshold=args.sparse_threshold, sparse_last_q=args.sparse_last_q,
                sparse_mass=args.sparse_mass, sparse_max_density=args.sparse_max_density,
                sparse_estimate_span=args.sparse_estimate_span, sparse_exact_diagonals=args.sparse_exact_diagonals,
                sparse_mass_union=args.sparse_mass_union, sparse_slash_window=args.sparse_slash_window,
                sparse_block_size=args.sparse_block_size, sparse_estimate=args.sparse_estimate)


def single_stream_kwargs(args) -> dict:
    """Engine arguments for commands that run one sequence at a time (generate, chat): a decode step never
    batches there, so auto does not keep the packed copy of the weights."""
    kw = engine_kwargs(args)
    if kw["packed_weights"] == "auto":
        kw["packed_weights"] = "off"
    return kw


def model_arg(args) -> str | None:
    return getattr(args, "model_pos", None) or args.model


def cmd_generate(args) -> int:
    from megactx import LLM, SamplingParams
    llm = LLM(model_arg(args), **single_stream_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    printed = 0

    def show(outputs):
        nonlocal printed
        text = outputs[0].text if outputs else ""
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)

    out = llm.chat([{"role": "user", "content": args.prompt}], params, on_step=show) if args.chat \
        else llm.generate(args.prompt, params, on_step=show)
    sys.stdout.write(out[0].text[printed:] + "\n")
    u = out[0].usage
    log.info("finish_reason=%s prompt_tokens=%d completion_tokens=%d", out[0].finish_reason, u.prompt_tokens,
             u.completion_tokens)
    return 0


def cmd_chat(args) -> int:
    from megactx.chat_cli import run_chat
    return run_chat(args)


def cmd_inspect(args) -> int:
    from megactx.inspect import describe
    print(describe(model_arg(args), args.tokens, dca_kwargs(args)))
    return 0


def cmd_serve(args) -> int:
    from megactx.server.app import serve
    return serve(args)


def cmd_bench_serve(args) -> int:
    from megactx.bench.serve import main as bench_main
    return bench_main(args)


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line, `megactx CMD: error: ...`, exit code 2: the full usage of an engine command is
    30 lines that bury the message (`--help` still prints it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrors(prog="megactx", description="Serve long-context language models.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt")
    g.add_argument("prompt")
    add_engine_args(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat")
    add_engine_args(c)
    c.add_argument("--file", action="append", default=[], help="attach a file to the first message (repeatable)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-tokens", type=int, default=1024)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="describe a model: architecture, context, tokenizer, KV memory")
    i.add_argument("model_pos", nargs="?", metavar="MODEL")
    i.add_argument("--model", default=None)
    i.add_argument("--tokens", type=int, default=None, help="KV memory needed for this many tokens")
    add_dca_args(i)
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s, positional_model=True)
    s.add_argument("--host", default=env_default("--host", "127.0.0.1"))
    s.add_argument("--port", type=int, default=env_default("--port", 8000, int))
    s.add_argument("--api-key", default=env_default("--api-key"))
    s.add_argument("--served-model-name", default=env_default("--served-model-name"))
    s.set_defaults(func=cmd_serve)

    from megactx.eval.cli import add_eval_parsers
    add_eval_parsers(sub, add_engine_args)
    from megactx.sparse.cli import add_sparse_parsers
    add_sparse_parsers(sub, add_engine_args)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bs = b.add_parser("serve", help="latency and throughput of a running server (loopback)")
    bs.add_argument("--base-url", required=True)
    bs.add_argument("--api-key", default=env_default("--api-key"))
    bs.add_argument("--model", default=None)
    bs.add_argument("--concurrency", type=int, default=1)
    bs.add_argument("--requests", type=int, default=8)
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--long-prompt-tokens", type=int, default=0,
                    help="first send one prompt of about this many tokens, to measure latency during its prefill")
    bs.add_argument("--long-prompt-delay", type=float, default=2.0)
    bs.add_argument("--allow-remote", action="store_true", help=argparse.SUPPRESS)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_bench_serve)
    from megactx.bench.ttft import add_parser as add_ttft_parser
    add_ttft_parser(b, env_default)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except MegactxError as e:
        print(f"megactx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
