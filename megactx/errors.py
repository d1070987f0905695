"""Typed errors. Every message names the thing that is wrong and, where there is one, the fix.

The CLI prints `megactx: error: <message>` and exits with code 2 for any MegactxError; the server
turns them into OpenAI-style error bodies.
"""


class MegactxError(Exception):
    """Base class of every error a user can cause (bad input, bad files, bad settings)."""


class ModelLoadError(MegactxError):
    """A model path, config or weight file cannot be used."""


class ConfigError(MegactxError):
    """An engine setting is invalid or inconsistent with the model."""


class RequestError(MegactxError):
    """One request is invalid (too long for the context, bad sampling parameters)."""
