"""`megactx inspect MODEL`: what a model is and what its context costs, read from headers only (no weights loaded)."""
from __future__ import annotations

from megactx.commands.flags import add_long_context_flags, engine_config
from megactx.config import log_fmt_bytes
from megactx.config.hardware import resolve_compute_dtype


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="describe a model: architecture, context, tokenizer, KV memory")
    i.add_argument("model_pos", nargs="?", metavar="MODEL")
    i.add_argument("--model", default=None)
    i.add_argument("--tokens", type=int, default=None, help="KV memory needed for this many tokens")
    add_long_context_flags(i)
    i.set_defaults(func=lambda args: print(describe(engine_config(args), args.tokens)) or 0)


def describe(config, tokens: int | None = None) -> str:
    """config: an EngineConfig; the DCA and sparse lines are what the engine would run with it."""
    from megactx.attention.sparse.patterns import resolve_sparse
    from megactx.loader import open_model
    from megactx.loader.tokenizer import load_tokenizer
    src = open_model(config.model)
    c = src.config
    tok = load_tokenizer(src.path, c.eos_token_ids)
    context = c.max_position_embeddings
    tokens = tokens or context
    lines = [
        f"model:            {src.path}",
        f"format:           {src.format}",
        f"architecture:     {c.architecture} ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads, head_dim {c.head_dim})",
        f"context length:   {context} (trained {c.trained_context_length})",
        f"rope:             {c.rope_type}, theta {c.rope_theta:g}" + (f", {c.rope_scaling}" if c.rope_scaling else ""),
        f"vocabulary:       {c.vocab_size}; tied embeddings: {c.tie_word_embeddings}",
        f"tokenizer:        {tok.kind}, {tok.vocab_size} tokens, eos ids {tok.eos_token_ids}",
        f"chat template:    {'present' if tok.has_chat_template else 'absent'}",
    ]
    dca = config.dca.resolve(c)
    lines.append("dual chunk attn: " + (dca.describe() if dca else "off (turn on with --dca)"))
    _, compute, why = resolve_compute_dtype(config.dtype, config.device)
    lines.append(f"compute dtype:    {compute}" + (f" (auto: {why})" if why else ""))
    sparse = resolve_sparse(config.sparse, src.path, compute)
    lines.append("sparse prefill:   " + (sparse[0].describe() if sparse else "off (--no-sparse)"))
    for name, nbytes in (("fp32", 4), ("bf16/fp16", 2)):
        per = c.kv_bytes_per_token(nbytes)
        lines.append(f"KV cache {name:9} {per} bytes/token; {tokens} tokens: {log_fmt_bytes(per * tokens)}")
    return "\n".join(lines)
