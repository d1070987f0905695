"""`megactx chat`: an interactive conversation in the terminal, answers streamed as they are generated."""
from __future__ import annotations

import os
import sys

from megactx.commands.flags import add_engine_flags, single_stream_config
from megactx.errors import MegactxError


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive chat")
    add_engine_flags(c)
    g = c.add_argument_group("Conversation")
    g.add_argument("--file", action="append", default=[], help="attach a file to the first message (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=run_chat)


def read_attachments(paths: list[str]) -> str:
    parts = []
    for p in paths:
        if not os.path.isfile(p):
            raise MegactxError(f"{p}: no such file to attach")
        try:
            with open(p, encoding="utf-8") as f:
                parts.append(f"--- {os.path.basename(p)} ---\n{f.read()}")
        except UnicodeDecodeError:
            raise MegactxError(f"{p}: not a UTF-8 text file; attach text files only") from None
    return "\n\n".join(parts)


def run_chat(args) -> int:
    from tqdm import tqdm

    from megactx import LLM, SamplingParams
    attachments = read_attachments(args.file)
    llm = LLM(config=single_stream_config(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if attachments:
            text, attachments = f"{attachments}\n\n{text}", ""
        messages.append({"role": "user", "content": text})
        printed, bar = 0, None

        def show(outputs):
            nonlocal printed, bar
            out = outputs[0]
            total, done = len(out.prompt_token_ids), out.metrics.get("prefill_done", 0)
            if total > 2048 and done < total:
                bar = bar or tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False)
                bar.update(done - bar.n)
            elif bar is not None:
                bar.close()
                bar = None
            sys.stdout.write(out.text[printed:])
            sys.stdout.flush()
            printed = len(out.text)

        out = llm.chat(messages, params, on_step=show)[0]
        if bar is not None:
            bar.close()
        sys.stdout.write(out.text[printed:] + "\n")
        sys.stdout.flush()
        if out.usage.cached_tokens:
            sys.stderr.write(f"({out.usage.cached_tokens} of {out.usage.prompt_tokens} prompt tokens reused from "
                             f"the cache)\n")
        messages.append({"role": "assistant", "content": out.text})
