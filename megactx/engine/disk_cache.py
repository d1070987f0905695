"""The prefix cache kept on disk: one safetensors file per full KV block, so a restarted engine reuses documents.

    DIR/<salt>/<name>.safetensors    k, v: [layers, kv heads, block size, head dim] in the KV dtype (an int8
                                     cache: k_scale, v_scale [..., 1] too)
                                     metadata: format, salt, name, blake2b checksum of the tensors' bytes
    DIR/<salt>/info.json             the model and settings of that salt, for people (`megactx cache ls`)

A block's name (kv_cache.block_hash) is a chain over its tokens and all tokens before it, seeded by the salt
(cache_salt.py: model fingerprint, dtypes, rope, DCA and sparse settings), so a file can only be found by an
engine whose keys it holds; the salt in its metadata is checked again on reading. Files are written to a
temporary name and renamed, so a reader never sees a half-written block under a real name; the checksum catches
what the rename cannot (a file cut short by a crash of the machine, bytes damaged on disk): such a file is skipped
with one warning, deleted, and its tokens are computed again. A full disk (or any write error) turns writing off
with one warning; the engine goes on with the cache in memory. Over its size limit the directory drops its least
recently used files (a read refreshes a file's time).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict

import torch
from safetensors import safe_open
from safetensors.torch import save

logger = logging.getLogger(__name__)
FORMAT = "megactx-kv-1"
SUFFIX = ".safetensors"
INFO = "info.json"
DEFAULT_DISK_SHARE = 0.5  # default size limit: this share of the free space when the engine starts


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_disk_size(directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    return int(shutil.disk_usage(directory).free * DEFAULT_DISK_SHARE)


def read_info(directory: str, salt: str) -> dict:
    try:
        with open(os.path.join(directory, salt, INFO)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def scan(directory: str) -> dict[str, list[tuple[str, int, float]]]:
    """{salt: [(path, bytes, last use)]} of every block file under `directory` (for `megactx cache ls`)."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    if not os.path.isdir(directory):
        return out
    for salt in sorted(os.listdir(directory)):
        sub = os.path.join(directory, salt)
        if not os.path.isdir(sub):
            continue
        for entry in os.scandir(sub):
            if entry.name.endswith(SUFFIX):
                st = entry.stat()
                out.setdefault(salt, []).append((entry.path, st.st_size, st.st_mtime))
    return out


class DiskKVCache:
    """The blocks on disk of one salt: `names` is the index (name -> file size, least recently used first), read
    once at start."""

    def __init__(self, directory: str, salt: bytes, shape: tuple[int, ...], max_bytes: int | None = None,
                 info: dict | None = None):
        self.salt, self.shape = salt.hex(), tuple(shape)
        self.dir = os.path.join(directory, self.salt)
        os.makedirs(self.dir, exist_ok=True)
        if info is not None and not os.path.exists(os.path.join(self.dir, INFO)):
            with open(os.path.join(self.dir, INFO), "w") as f:
                json.dump(info, f, indent=1, default=str)
        self.max_bytes = default_disk_size(self.dir) if max_bytes is None else max_bytes
        self.writable = True
        found = []
        for entry in os.scandir(self.dir):
            if entry.name.endswith(SUFFIX):
                st = entry.stat()
                found.append((st.st_mtime, bytes.fromhex(entry.name[:-len(SUFFIX)]), st.st_size))
            elif ".tmp" in entry.name:  # left by a process killed while writing
                os.unlink(entry.path)
        self.names: OrderedDict[bytes, int] = OrderedDict((n, size) for _, n, size in sorted(found))
        self.used = sum(self.names.values())
        logger.info("KV cache on disk: %s, %d blocks (%.1f MiB of at most %.1f MiB)", self.dir, len(self.names),
                    self.used / 2**20, self.max_bytes / 2**20)

    def path(self, name: bytes) -> str:
        return os.path.join(self.dir, name.hex() + SUFFIX)

    def __contains__(self, name: bytes) -> bool:
        return name in self.names

    def write(self, name: bytes, tensors: dict[str, torch.Tensor]) -> None:
        """Store one block (k, v: [L, Hkv, block, D], and scales); an error turns writing off instead of failing
        the request."""
        if not self.writable or name in self.names:
            return
        meta = {"format": FORMAT, "salt": self.salt, "name": name.hex(), "checksum": checksum(tensors)}
        data = save({key: t.contiguous() for key, t in tensors.items()}, metadata=meta)
        if len(data) > self.max_bytes:
            return
        self._make_room(len(data))
        final = self.path(name)
        tmp = f"{final}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as e:
            self.writable = False
            try:
                os.unlink(tmp)
            except OSError:
                pass
            why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
            logger.warning("KV cache on disk: cannot write to %s (%s); keeping the prefix cache in memory only",
                           self.dir, why)
            return
        self.names[name] = len(data)
        self.used += len(data)

    def read(self, name: bytes) -> dict[str, torch.Tensor] | None:
        """The block's tensors, or None (with one warning, the file deleted) when it is damaged or not this salt's."""
        path = self.path(name)
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            k, v = tensors["k"], tensors["v"]
            problem = None
            if meta.get("format") != FORMAT or meta.get("salt") != self.salt or meta.get("name") != name.hex():
                problem = "it holds another block, or comes from another model or other settings"
            elif tuple(k.shape) != self.shape or tuple(v.shape) != self.shape:
                problem = f"its blocks have shape {tuple(k.shape)}, not {self.shape}"
            elif meta.get("checksum") != checksum(tensors):
                problem = "its checksum does not match (damaged)"
        except FileNotFoundError:
            self._drop(name)
            return None
        except Exception as e:  # a truncated or garbled file: safetensors cannot parse it
            problem = f"it cannot be read ({type(e).__name__}: {e})"
        if problem is not None:
            logger.warning("KV cache on disk: skipping %s: %s; deleting it, its tokens are computed again",
                           path, problem)
            self._drop(name, delete=True)
            return None
        os.utime(path)  # most recently used, also for the next engine's index
        self.names.move_to_end(name)
        return tensors

    def _drop(self, name: bytes, delete: bool = False) -> None:
        self.used -= self.names.pop(name, 0)
        if delete:
            try:
                os.unlink(self.path(name))
            except OSError:
                pass

    def _make_room(self, size: int) -> None:
        if self.used + size <= self.max_bytes:
            return
        while self.names and self.used + size > self.max_bytes:
            self._drop(next(iter(self.names)), delete=True)
