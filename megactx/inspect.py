"""`megactx inspect`: what a model is and what its context costs, read from headers only (no weights loaded)."""
from __future__ import annotations

from megactx.config import log_fmt_bytes
from megactx.loader import open_model
from megactx.loader.tokenizer import load_tokenizer


def describe(model: str | None, tokens: int | None = None, dca: dict | None = None) -> str:
    from megactx.attention.dca import resolve_dca
    src = open_model(model)
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
    dca = dca or {}
    effective = resolve_dca(c, dca.get("dca", False), dca.get("dca_chunk_size"), dca.get("dca_local_size"),
                            dca.get("dca_original_max_position"), dca.get("dca_temperature"))
    lines.append("dual chunk attn: " + (effective.describe() if effective else "off (turn on with --dca)"))
    from megactx.sparse.config import resolve_sparse
    # the engine's own settings (megactx/cli.py dca_kwargs), so that inspect says what serve would do
    settings = {key: dca[f"sparse_{key}"] for key in ("mass", "max_density", "estimate_span", "exact_diagonals",
                                                       "mass_union", "slash_window", "estimate", "block_size")
                if dca.get(f"sparse_{key}") is not None}
    sparse = resolve_sparse(src.path, dca.get("sparse", True), dca.get("sparse_config"),
                            dca.get("sparse_threshold", 32768), dca.get("sparse_last_q", 64), **settings)
    lines.append("sparse prefill:   " + (sparse.describe() if sparse else "off (--no-sparse)"))
    for name, nbytes in (("fp32", 4), ("bf16/fp16", 2)):
        per = c.kv_bytes_per_token(nbytes)
        lines.append(f"KV cache {name:9} {per} bytes/token; {tokens} tokens: {log_fmt_bytes(per * tokens)}")
    return "\n".join(lines)
