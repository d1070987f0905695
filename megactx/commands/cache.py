"""`megactx cache ls | rm | warm`: see, clear and pre-fill the prefix cache kept on disk (--kv-cache-dir).

    megactx cache ls --kv-cache-dir DIR                 one line per model and settings: blocks, size, last use
    megactx cache rm --kv-cache-dir DIR [ID ...]        delete those entries (all of them without an ID)
    megactx cache warm --kv-cache-dir DIR --file DOC    compute DOC's blocks now, so that `megactx chat --file DOC`
                                                        (and an API request that starts the same way) skips them
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from megactx.commands.chat import read_attachments
from megactx.commands.flags import add_engine_flags, env_value, single_stream_config
from megactx.config import log_fmt_bytes
from megactx.errors import MegactxError


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="see, clear and pre-fill the prefix cache on disk")
    actions = c.add_subparsers(dest="action", required=True)
    for name, help_text in (("ls", "list what the cache holds"), ("rm", "delete cached blocks")):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("--kv-cache-dir", default=env_value("--kv-cache-dir"), metavar="KV_CACHE_DIR",
                       help="the cache directory (as given to serve, chat, generate)")
        if name == "rm":
            a.add_argument("ids", nargs="*", metavar="ID", help="entries to delete, as `ls` shows them (a prefix "
                                                                "is enough); default: all")
        a.set_defaults(func=run_ls if name == "ls" else run_rm)
    w = actions.add_parser("warm", help="compute a document's prefix blocks now (as `chat --file` sends it)")
    add_engine_flags(w)
    w.add_argument("--file", action="append", required=True, help="the document (repeatable, as in chat)")
    w.add_argument("--system", default=None, help="the system message chat will be given, if any")
    w.set_defaults(func=run_warm)


def _directory(args) -> str:
    if not args.kv_cache_dir:
        raise MegactxError("give the cache directory with --kv-cache-dir DIR (or MEGACTX_KV_CACHE_DIR)")
    if not os.path.isdir(args.kv_cache_dir):
        raise MegactxError(f"{args.kv_cache_dir}: no such directory")
    return args.kv_cache_dir


def run_ls(args) -> int:
    from megactx.engine.disk_cache import read_info, scan
    directory = _directory(args)
    entries = scan(directory)
    if not entries:
        print(f"{directory}: empty")
        return 0
    print(f"{'ID':12}  {'blocks':>7}  {'size':>10}  {'last used':16}  model and settings")
    total = 0
    for salt, items in entries.items():
        size = sum(s for _, s, _ in items)
        total += size
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(t for _, _, t in items)))
        info = read_info(directory, salt)
        what = ", ".join(f"{k}={v}" for k, v in info.items() if v is not None) or "(no info.json)"
        print(f"{salt[:12]:12}  {len(items):7d}  {log_fmt_bytes(size):>10}  {last:16}  {what}")
    print(f"total {log_fmt_bytes(total)} in {directory}")
    return 0


def run_rm(args) -> int:
    from megactx.engine.disk_cache import scan
    directory = _directory(args)
    salts = [s for s in os.listdir(directory) if os.path.isdir(os.path.join(directory, s))]
    chosen = salts if not args.ids else [s for s in salts if any(s.startswith(i) for i in args.ids)]
    unknown = [i for i in args.ids if not any(s.startswith(i) for s in salts)]
    if unknown:
        raise MegactxError(f"no cache entry {', '.join(unknown)} in {directory}; `megactx cache ls` lists them")
    sizes = scan(directory)
    freed = sum(s for salt in chosen for _, s, _ in sizes.get(salt, []))
    for salt in chosen:
        shutil.rmtree(os.path.join(directory, salt))
    print(f"deleted {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}, {log_fmt_bytes(freed)}")
    return 0


def run_warm(args) -> int:
    from megactx import LLM, SamplingParams
    if not args.kv_cache_dir:
        raise MegactxError("give the cache directory with --kv-cache-dir DIR (or MEGACTX_KV_CACHE_DIR)")
    document = read_attachments(args.file)
    llm = LLM(config=single_stream_config(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    # chat sends "<document>\n\n<question>" as its first user message: the templated text up to the question is
    # what every question about the document shares
    marker = "\u2063MEGACTX-QUESTION\u2063"
    messages.append({"role": "user", "content": f"{document}\n\n{marker}"})
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = llm.tokenizer.encode(text[:text.index(marker)], add_special_tokens=False)
    start = time.monotonic()
    out = llm.generate(prompt, SamplingParams(max_tokens=1))[0]
    stats = llm.engine.stats
    print(f"{len(prompt)} tokens: {stats['prompt_tokens_computed']} computed, {out.usage.cached_tokens} already "
          f"cached; {stats['blocks_written']} blocks written to {args.kv_cache_dir} in "
          f"{time.monotonic() - start:.1f} s", file=sys.stdout)
    return 0
