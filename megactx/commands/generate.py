"""`megactx generate PROMPT`: complete one prompt, streamed to stdout."""
from __future__ import annotations

import logging
import sys

from megactx.commands.flags import add_engine_flags, single_stream_config

log = logging.getLogger("megactx")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete one prompt")
    g.add_argument("prompt")
    add_engine_flags(g)
    s = g.add_argument_group("Sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.set_defaults(func=run)


def run(args) -> int:
    from megactx import LLM, SamplingParams
    llm = LLM(config=single_stream_config(args))
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
