"""Structured output on 20 JSON schemas: does every output parse and validate, and what does the grammar cost?

The bundled SmolLM2 (or --model) answers one question per schema, sampled at temperature 1 with a few seeds,
through the engine's constrained decoding (response_format json_schema in the server). Each output is parsed and
validated with jsonschema (the reference validator). The decode rate is measured with and without the constraint
on the same prompts and seeds, side by side.

  python benchmarks/structured_output.py [--model M] [--seeds 3] [--out benchmarks/results/structured_output.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jsonschema

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megactx import LLM, SamplingParams  # noqa: E402
from megactx.config.hardware import cpu_summary  # noqa: E402
from megactx.sampling import GuidedDecoding  # noqa: E402

S, I, N, B = {"type": "string", "maxLength": 24}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required: bool = True, **props) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required else [],
            "additionalProperties": False}


SCHEMAS = {
    "person": obj(name=S, age={"type": "integer", "minimum": 0, "maximum": 130}),
    "city": obj(city=S, country=S, population=I),
    "flags": obj(ok=B, retry=B),
    "enum": obj(colour={"enum": ["red", "green", "blue"]}),
    "const": obj(version={"const": 2}, name=S),
    "list_of_strings": obj(tags={"type": "array", "items": S, "minItems": 1, "maxItems": 4}),
    "list_of_numbers": obj(values={"type": "array", "items": N, "maxItems": 5}),
    "nested": obj(user=obj(id=I, email=S), active=B),
    "array_of_objects": obj(items={"type": "array", "items": obj(sku=S, qty=I), "maxItems": 3}),
    "optional": obj(required=False, title=S, subtitle=S),
    "nullable": obj(note={"type": ["string", "null"], "maxLength": 24}),
    "pattern": obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}),
    "date": obj(day={"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-[0-2][0-9]$"}),
    "anyof": obj(value={"anyOf": [I, S]}),
    "bounded_number": obj(score={"type": "number", "minimum": 0, "maximum": 1}),
    "tuple": obj(point={"type": "array", "prefixItems": [N, N], "items": False, "minItems": 2}),
    "deep": obj(a=obj(b=obj(c=obj(d=S)))),
    "many_fields": obj(**{f"f{i}": I for i in range(8)}),
    "tool_call": obj(name={"enum": ["get_weather", "get_time"]}, arguments=obj(city=S)),
    "free_object": {"type": "object"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default="benchmarks/results/structured_output.json")
    args = ap.parse_args()
    llm = LLM(args.model, dtype="fp32", max_model_len=2048, max_num_seqs=1)
    tok = llm.engine.tokenizer
    rows, timing = [], {"constrained": [0, 0.0], "free": [0, 0.0]}
    for name, schema in SCHEMAS.items():
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Give me a {name.replace('_', ' ')} as JSON."}])
        for seed in range(args.seeds):
            for kind in ("constrained", "free"):
                guided = GuidedDecoding("json_schema", schema) if kind == "constrained" else None
                params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=seed, guided=guided)
                t0 = time.perf_counter()
                out = llm.generate([prompt], params)[0]
                seconds = time.perf_counter() - t0
                c = out.outputs[0]
                timing[kind][0] += len(c.token_ids)
                timing[kind][1] += seconds
                if kind == "free":
                    continue
                try:
                    jsonschema.validate(json.loads(c.text), schema)
                    valid, error = True, None
                except (ValueError, jsonschema.ValidationError) as e:
                    valid, error = False, f"{type(e).__name__}: {str(e)[:120]}"
                rows.append({"schema": name, "seed": seed, "valid": valid, "finish_reason": c.finish_reason,
                             "tokens": len(c.token_ids), "text": c.text[:300], "error": error})
    valid = sum(r["valid"] for r in rows)
    rates = {k: round(n / s, 1) for k, (n, s) in timing.items()}
    print(f"CPU: {cpu_summary()}")
    ended = [r for r in rows if r["finish_reason"] != "length"]  # a cut output is cut JSON, as in OpenAI's API
    print("| schemas | outputs | parse and validate | of those that ended | cut by max_tokens | tok/s constrained "
          "| tok/s free |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(SCHEMAS)} | {len(rows)} | {valid} ({100 * valid / len(rows):.0f} %) | "
          f"{sum(r['valid'] for r in ended)}/{len(ended)} | {len(rows) - len(ended)} | {rates['constrained']} "
          f"| {rates['free']} |")
    for r in rows:
        if not r["valid"]:
            print(f"  invalid: {r['schema']} seed {r['seed']}: {r['error']} :: {r['text'][:100]!r}")
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu_summary(), "model": args.model or "bundled SmolLM2-135M-Instruct",
                   "schemas": len(SCHEMAS), "outputs": len(rows), "valid": valid, "tok_s": rates, "rows": rows},
                  f, indent=1)


if __name__ == "__main__":
    main()
