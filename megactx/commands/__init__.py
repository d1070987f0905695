"""Command line: megactx serve | generate | chat | cache | inspect | eval | bench | sparse.

Each command is a module here with add_parser(sub); engine flags come from the config fields (flags.py), and
every flag can also be set with an environment variable MEGACTX_<FLAG> (e.g. MEGACTX_MAX_MODEL_LEN).
User errors print one line, `megactx: error: ...`, and exit with code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from megactx.commands import bench, cache, chat, eval as eval_cmd, generate, inspect, serve, sparse
from megactx.errors import MegactxError


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line, `megactx CMD: error: ...`, exit code 2: the full usage of an engine command is
    30 lines that bury the message (`--help` still prints it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrors(prog="megactx", description="Serve long-context language models.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in (generate, chat, cache, inspect, serve, eval_cmd, sparse, bench):
        module.add_parser(sub)
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
