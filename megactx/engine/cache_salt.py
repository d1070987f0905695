"""The salt of the prefix cache's block names: everything besides the tokens that a cached key or value depends on.

Two engines may share cached blocks (in memory or on disk) only when every one of these agrees: the model's files
(their sizes and a sample of their bytes: a cheap fingerprint that survives a copy), the compute, weight and KV
dtypes, the block size, the rope settings, every DCA setting and the sparse prefill settings. The keys of the first
layer depend only on the tokens, the weights and the rope (DCA: keys rotated at p % L), but every later layer's
keys depend on the attention outputs of the layers below: on DCA's query positions and temperature, and on which
pairs a sparse prefill computed (its dense tail included).
"""
from __future__ import annotations

import hashlib
import json
import os

SAMPLE = 1 << 20  # bytes read at the start and the end of each model file


def model_fingerprint(path: str) -> str:
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json", ".gguf")))
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE))
            if size > 2 * SAMPLE:
                fh.seek(size - SAMPLE)
                h.update(fh.read(SAMPLE))
    return h.hexdigest()


def cache_salt(model_path: str, model_config, settings: dict) -> bytes:
    """settings: the engine's dtypes, block size, DCA and sparse settings in effect (plain values)."""
    rope = {"theta": model_config.rope_theta, "scaling": model_config.rope_scaling}
    text = json.dumps({"model": model_fingerprint(model_path), "rope": rope, **settings}, sort_keys=True,
                      default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
