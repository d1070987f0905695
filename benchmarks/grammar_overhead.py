"""Structured output's cost per generated token: llguidance vs xgrammar vs outlines-core on this CPU.

For each tokenizer (the bundled SmolLM2, 49K tokens; optionally a Qwen2.5 GGUF, 151K tokens) and each grammar
library, a JSON schema is compiled, then a valid document is walked token by token as decoding would:
compute the next-token mask, apply it to a logits row, accept the token. Reported: the schema's compile time
and the first mask's time (llguidance builds its lexer lazily there), then the mean and 95th-percentile time per
token (mask + apply + accept), the figure that adds to every decode
step of a constrained request.

    python benchmarks/grammar_overhead.py [--model EVAL.gguf] [--out benchmarks/results/grammar_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megactx.config.hardware import cpu_summary
from megactx.loader.tokenizer import load_tokenizer
from megactx.loader import default_model_path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                       "tags": ["mathematics", "engines", "poetry of science"],
                       "address": {"city": "London", "zip": "W1J 7NT"}})


def walk_llguidance(hf, ids, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - t0
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    logits = torch.zeros(1, vocab)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(matcher, mask, 0)
        lt.apply_token_bitmask_inplace(logits[:, :tok.vocab_size], mask)
        assert matcher.consume_token(t), matcher.get_error()
        steps.append(time.perf_counter() - t0)
    return tok_s, compile_s, steps


def walk_xgrammar(hf, ids, vocab):
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.zeros(1, vocab)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert matcher.accept_token(t)
        steps.append(time.perf_counter() - t0)
    return tok_s, compile_s, steps


def walk_outlines(hf, ids, vocab):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    tokens: dict[str, list[int]] = {}
    special = set(hf.all_special_ids)
    for token, i in hf.get_vocab().items():
        if i not in special:
            tokens.setdefault(hf.convert_tokens_to_string([token]), []).append(i)
    vocabulary = Vocabulary(hf.eos_token_id, tokens)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?"), vocabulary))
    compile_s = time.perf_counter() - t0
    logits = torch.zeros(1, vocab)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        allowed = torch.tensor(guide.get_tokens())
        masked = torch.full_like(logits, float("-inf"))
        masked[0, allowed] = logits[0, allowed]
        guide.advance(t)
        steps.append(time.perf_counter() - t0)
    return tok_s, compile_s, steps


LIBRARIES = {"llguidance": walk_llguidance, "xgrammar": walk_xgrammar, "outlines-core": walk_outlines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="a model whose tokenizer to use (repeatable; default: bundled)")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--out", default="benchmarks/results/grammar_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model in args.model or [default_model_path()]:
        tok = load_tokenizer(model)
        ids = tok.encode(DOCUMENT, add_special_tokens=False)
        vocab = max(len(tok.hf), max(tok.hf.get_vocab().values()) + 1)
        for name in args.libraries.split(","):
            try:
                tok_s, compile_s, steps = LIBRARIES[name](tok.hf, ids, vocab)
            except Exception as e:  # a library that cannot handle this tokenizer is a result too
                rows.append({"model": model.rsplit("/", 1)[-1], "library": name, "error": f"{type(e).__name__}: {e}"})
                print(rows[-1])
                continue
            first_ms, steps_ms = 1000 * steps[0], sorted(1000 * s for s in steps[1:])
            rows.append({"model": model.rsplit("/", 1)[-1], "vocab": vocab, "library": name, "tokens": len(ids),
                         "tokenizer_s": round(tok_s, 3), "compile_s": round(compile_s, 3),
                         "first_mask_ms": round(first_ms, 1),
                         "per_token_ms_mean": round(statistics.mean(steps_ms), 3),
                         "per_token_ms_p95": round(steps_ms[int(0.95 * (len(steps_ms) - 1))], 3)})
    print(f"CPU: {cpu_summary()}, 1 thread")
    print("| tokenizer | vocab | library | tokenizer set-up s | schema compile s | first mask ms | per token ms (mean / p95) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | {r['library']} | failed: {r['error']} | | | |")
        else:
            print(f"| {r['model']} | {r['vocab']} | {r['library']} | {r['tokenizer_s']} | {r['compile_s']} | {r['first_mask_ms']} | "
                  f"{r['per_token_ms_mean']} / {r['per_token_ms_p95']} |")
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu_summary(), "threads": 1, "schema": SCHEMA, "document": DOCUMENT, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
