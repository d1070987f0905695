"""The prefix cache on disk: a new engine (a restart) reuses the blocks an earlier one wrote and gives the tokens and
logprobs of a fresh computation; a file of other settings is never used; damaged, truncated or half-written files
(a process killed mid-write) are skipped with one warning and recomputed; a full disk degrades to memory only."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from megactx import LLM, SamplingParams
from megactx.engine import disk_cache
from megactx.engine.kv_cache import block_hash
from helpers import token_ids

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def path(dca_model):
    return dca_model


def _engine(path, cache_dir=None, **kw):
    kw.setdefault("max_model_len", 512)
    kw.setdefault("dtype", "fp32")
    return LLM(path, block_size=16, max_num_batched_tokens=64, kv_cache_dir=cache_dir, dca=True, **kw)


def _same(a, b):
    assert a.token_ids == b.token_ids
    for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=2e-4)


def _block_files(llm, tokens):
    """The file of each full block of `tokens`, in order (the names are a chain, as kv_cache.block_hash makes them)."""
    names, parent = [], llm.engine.allocator.salt
    for i in range(len(tokens) // 16):
        parent = block_hash(parent, tokens[i * 16:(i + 1) * 16])
        names.append(llm.engine.disk.path(parent))
    return names


def _files(d):
    return sorted(p for _, items in disk_cache.scan(str(d)).items() for p, _, _ in items)


@pytest.fixture(scope="module")
def fresh(path):
    """The reference: the question computed from scratch, with no cache at all."""
    doc = token_ids(170, seed=11)
    question = doc + token_ids(20, seed=12)
    return doc, question, _engine(path, prefix_caching=False).generate(question, PARAMS)[0]


def test_a_restarted_engine_reuses_the_blocks_on_disk(path, fresh, tmp_path):
    doc, question, reference = fresh
    first = _engine(path, tmp_path)
    first.generate(doc + token_ids(9, seed=13), PARAMS)
    assert first.engine.stats["blocks_written"] == len(_files(tmp_path)) >= 10
    del first
    second = _engine(path, tmp_path)  # a new engine: nothing in memory
    out = second.generate(question, PARAMS)[0]
    assert out.usage.cached_tokens == 160  # the document's 10 full blocks
    assert second.engine.stats["blocks_read"] == 10
    assert second.engine.stats["prompt_tokens_computed"] == len(question) - 160
    _same(out, reference)


@pytest.mark.parametrize("other", [
    {"dca_chunk_size": 64},  # keys rotated at p % 56
    {"dca_temperature": "none"},  # the queries change, so do the keys of every layer above the first
])
def test_blocks_of_other_settings_are_never_used(path, fresh, tmp_path, other):
    doc, question, _ = fresh
    _engine(path, tmp_path).generate(question, PARAMS)
    other = _engine(path, tmp_path, **other)
    assert other.generate(question, PARAMS)[0].usage.cached_tokens == 0
    assert len(os.listdir(tmp_path)) == 2  # one directory per salt


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_file_is_skipped_with_one_warning_and_recomputed(path, fresh, tmp_path, caplog, damage):
    doc, question, reference = fresh
    writer = _engine(path, tmp_path)
    writer.generate(question, PARAMS)
    files = _block_files(writer, question)
    victim = files[4]  # the fifth block of the chain (files are written in order)
    data = open(victim, "rb").read()
    if damage == "flip":
        data = data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]
    elif damage == "truncate":
        data = data[:len(data) // 2]
    else:  # a valid file of the same name, holding another block's contents
        data = open(files[3], "rb").read()
    open(victim, "wb").write(data)
    caplog.set_level(logging.WARNING, logger="megactx")
    llm = _engine(path, tmp_path)
    out = llm.generate(question, PARAMS)[0]
    warnings = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1 and os.path.basename(victim) in warnings[0].getMessage()
    assert out.usage.cached_tokens == 4 * 16  # the chain stops before the damaged block
    _same(out, reference)
    assert os.path.exists(victim)  # computed again and written again, intact this time
    assert _engine(path, tmp_path).generate(question, PARAMS)[0].usage.cached_tokens == 176  # all 11 full blocks


def test_a_full_disk_degrades_to_memory_only(path, fresh, tmp_path, monkeypatch, caplog):
    doc, question, reference = fresh
    real_open = open
    written = []

    def open_failing_after_three(file, mode="r", *a, **k):
        if "w" in mode and ".tmp" in str(file):
            written.append(file)
            if len(written) > 3:
                raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(disk_cache, "open", open_failing_after_three, raising=False)
    caplog.set_level(logging.WARNING, logger="megactx")
    llm = _engine(path, tmp_path)
    llm.generate(question, PARAMS)
    out = llm.generate(question, PARAMS)[0]  # the memory cache still works
    monkeypatch.undo()
    assert out.usage.cached_tokens == 176
    _same(out, reference)
    assert len(_files(tmp_path)) == 3 and not [f for f in os.listdir(tmp_path / os.listdir(tmp_path)[0])
                                               if ".tmp" in f]
    full = [r for r in caplog.records if "disk is full" in r.getMessage()]
    assert len(full) == 1


def test_the_size_limit_drops_the_least_recently_used_blocks(path, tmp_path):
    llm = _engine(path, tmp_path)
    llm.generate(token_ids(40, seed=21), PARAMS)  # two blocks
    one = os.path.getsize(_files(tmp_path)[0])
    limit = 5 * one
    small = _engine(path, tmp_path, kv_cache_disk_size=limit)
    small.generate(token_ids(100, seed=22), PARAMS)  # six more blocks: only five fit
    files = _files(tmp_path)
    assert len(files) == 5 and sum(os.path.getsize(f) for f in files) <= limit


KILLED_WRITER = """
import random, sys
from megactx import LLM, SamplingParams
llm = LLM(sys.argv[1], block_size=16, max_num_batched_tokens=16, max_model_len=4096, dca=True, kv_cache_dir=sys.argv[2],
          dtype="fp32")
print("ready", flush=True)
prompt = list(range(100, 3100))
while True:  # a block written every step until killed
    llm.generate(prompt, SamplingParams(max_tokens=1))
    prompt = [random.randrange(100, 30000) for _ in range(3000)]
"""


def test_a_process_killed_while_writing_leaves_a_usable_cache(path, tmp_path):
    """kill -9 at a random point of a prefill that writes a block every step: whatever is on disk afterwards is
    either used intact or skipped; a new engine's answer equals a fresh computation's."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, path, str(tmp_path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while len(_files(tmp_path)) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_files(tmp_path)) >= 20
    prompt = list(range(100, 3100))
    reference = _engine(path, prefix_caching=False, max_model_len=4096).generate(prompt, PARAMS)[0]
    out = _engine(path, tmp_path, max_model_len=4096).generate(prompt, PARAMS)[0]
    assert out.usage.cached_tokens >= 19 * 16
    assert not [f for d in os.listdir(tmp_path) for f in os.listdir(tmp_path / d) if ".tmp" in f]
    _same(out, reference)
