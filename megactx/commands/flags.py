"""The one place where config fields become command-line flags and MEGACTX_* environment variables.

Every field declared with `setting(...)` (megactx/config/fields.py) and not marked cli=False becomes a flag named
after its flat name (`max_model_len` -> `--max-model-len`), with the field's help and default; the environment
variable MEGACTX_<FLAG> (e.g. MEGACTX_MAX_MODEL_LEN) replaces the default. `engine_config(args)` turns the parsed
flags back into an EngineConfig through the same flat names that LLM(...) takes.
"""
from __future__ import annotations

import argparse
import os
import typing

from megactx.config import EngineConfig, ServerConfig
from megactx.config.engine import GROUPS, flat_fields
from megactx.errors import MegactxError

ENGINE_CLASSES = (EngineConfig, GROUPS["cache"], GROUPS["scheduler"], GROUPS["parallel"])
LONG_CONTEXT_CLASSES = (GROUPS["dca"], GROUPS["sparse"])


def env_name(flag: str) -> str:
    return "MEGACTX_" + flag.lstrip("-").replace("-", "_").upper()


def env_value(flag: str, cast=str, default=None):
    """The MEGACTX_<FLAG> variable cast to the flag's type, or `default` when it is not set."""
    value = os.environ.get(env_name(flag))
    if value is None:
        return default
    try:
        return cast(value)
    except ValueError:
        raise MegactxError(f"environment variable {env_name(flag)}={value!r} is not a valid {cast.__name__}") from None


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _cast(cls, f):
    if f.metadata.get("type"):
        return f.metadata["type"]
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_flags(parser: argparse.ArgumentParser, classes, skip: tuple[str, ...] = ()) -> None:
    """One flag per cli field of each class, in an argument group titled by the class."""
    for cls in classes:
        group = parser.add_argument_group(cls.title)
        for name, f in flat_fields(cls).items():
            if not f.metadata["cli"] or name in skip:
                continue
            flag = f.metadata["flag"] or "--" + name.replace("_", "-")
            cast = _cast(cls, f)
            help_text = f.metadata["help"]
            if cast is bool and f.metadata["negate"]:  # on by default, the flag turns it off
                group.add_argument(flag, dest=name, action="store_false", help=help_text,
                                   default=not env_value(flag, _truthy, False))
            elif cast is bool:
                group.add_argument(flag, dest=name, action="store_true", help=help_text,
                                   default=env_value(flag, _truthy, f.default))
            else:
                if f.default is not None:
                    help_text += f" (default: {f.default})"
                group.add_argument(flag, dest=name, type=cast, choices=f.metadata["choices"], help=help_text,
                                   default=env_value(flag, cast, f.default),
                                   metavar=None if f.metadata["choices"] else env_name(flag).removeprefix("MEGACTX_"))


def add_engine_flags(parser: argparse.ArgumentParser, positional_model: bool = False) -> None:
    """Every engine flag; positional_model: the model may also be given as the first argument (serve)."""
    if positional_model:
        parser.add_argument("model_pos", nargs="?", metavar="MODEL",
                            help="HF directory or .gguf file (default: bundled SmolLM2)")
    add_flags(parser, ENGINE_CLASSES + LONG_CONTEXT_CLASSES)


def add_long_context_flags(parser: argparse.ArgumentParser) -> None:
    """The DCA and sparse flags alone (inspect: what the engine would do, without loading weights)."""
    add_flags(parser, LONG_CONTEXT_CLASSES)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, (ServerConfig,))


def model_arg(args) -> str | None:
    return getattr(args, "model_pos", None) or getattr(args, "model", None)


def setting_values(args, classes) -> dict:
    """The parsed flags of these classes, by flat name."""
    return {name: getattr(args, name) for cls in classes for name, f in flat_fields(cls).items()
            if f.metadata["cli"] and hasattr(args, name)}


def engine_config(args, **overrides) -> EngineConfig:
    """The EngineConfig the flags describe; overrides (flat names) win, e.g. max_num_seqs=1 for one-stream tools."""
    values = setting_values(args, ENGINE_CLASSES + LONG_CONTEXT_CLASSES)
    values.pop("model", None)
    values.update(overrides)
    return EngineConfig.from_kwargs(model_arg(args), **values)


def server_config(args) -> ServerConfig:
    return ServerConfig(**setting_values(args, (ServerConfig,)))


def single_stream_config(args, **overrides) -> EngineConfig:
    """For commands that run one sequence at a time (generate, chat): a decode step never batches there, so
    packed_weights auto does not keep the packed copy of the weights."""
    if getattr(args, "packed_weights", "auto") == "auto":
        overrides.setdefault("packed_weights", "off")
    return engine_config(args, **overrides)
