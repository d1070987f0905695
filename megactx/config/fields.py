"""What every setting is made of: a dataclass field that carries its help text and how it becomes a flag.

`setting(default, help)` declares a field once, with its default and its help; the command line
(megactx/commands/flags.py) turns it into a flag and a MEGACTX_* environment variable, and `LLM(...)` takes it as a
keyword argument of the same name. Each config dataclass checks its own fields in __post_init__.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, field

from megactx.errors import ConfigError

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16", "auto": "auto"}


def setting(default=MISSING, help: str = "", *, name: str | None = None, flag: str | None = None,
            cli: bool = True, choices: tuple | None = None, type=None, negate: bool = False):
    """A config field. name: its keyword in LLM(...) and its flag's dest (default: the class's prefix + the field
    name); flag: the option string (default: --name with dashes); cli: False keeps it out of the command line
    (set it from Python); type: the parser of a flag's text when the default does not tell (e.g. int for a field
    whose default is None); negate: a boolean that is on by default and turned off by the flag (--no-sparse)."""
    meta = {"help": help, "name": name, "flag": flag, "cli": cli, "choices": choices, "type": type,
            "negate": negate}
    return field(default=default, metadata=meta)


def parse_dtype(name: str):
    import torch
    key = DTYPES.get(str(name).lower())
    if key is None:
        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return None if key == "auto" else getattr(torch, key)


def parse_bytes(text: str | int | float) -> int:
    """'4GiB', '512M', '1.5G', 1e9 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 4GiB, 512MiB or 1000000000") from None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def log_fmt_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    i = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** i:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][i]}"
