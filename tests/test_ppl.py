"""Perplexity per bucket: chunked scoring equals a direct computation with transformers, full and windowed."""
import math

import torch

from megactx.eval.ppl import document_ids, perplexity_by_bucket, stdlib_text
from conftest import hf_forward
from helpers import make_engine, token_ids


def _nll(logits, ids, t):
    return float(torch.logsumexp(logits, -1) - logits[ids[t]])


def test_full_and_windowed_perplexity_equal_direct_computation(tiny_dir, monkeypatch):
    import megactx.engine.llm_engine as llm_engine
    monkeypatch.setattr(llm_engine, "LOGIT_ROWS", 5)  # logits come in slices smaller than the prefill chunks
    path = tiny_dir("qwen2", num_key_value_heads=2)
    ids = token_ids(100, seed=5)
    engine = make_engine(path)
    full = hf_forward(path, ids)
    expected = {}
    for t in range(1, 100):
        expected.setdefault(t // 32, []).append(_nll(full[t - 1], ids, t))
    assert [start for start, _ in engine.iter_logits(ids[:20], 16)] == [0, 5, 10, 15, 16]
    rows = perplexity_by_bucket(engine, ids, bucket=32, chunk=16)
    assert [r["tokens"] for r in rows] == [31, 32, 32, 4]
    for r, b in zip(rows, sorted(expected)):
        assert math.isclose(r["ppl"], math.exp(sum(expected[b]) / len(expected[b])), rel_tol=1e-4)
    # window 40, stride 20: windows end at 40, 60, 80, 99; target t is scored in the first window reaching it
    window, got = 40, perplexity_by_bucket(engine, ids, bucket=32, window=40, chunk=7)
    expected = {}
    for t in range(1, 100):
        end = 40 if t <= 40 else min(99, 40 + 20 * math.ceil((t - 40) / 20))
        begin = max(0, end - window)
        logits = hf_forward(path, ids[begin:t])[-1]
        expected.setdefault(t // 32, []).append(_nll(logits, ids, t))
    for r, b in zip(got, sorted(expected)):
        assert math.isclose(r["ppl"], math.exp(sum(expected[b]) / len(expected[b])), rel_tol=1e-4)
    # inside the first window both see the same context (chunking differs: fp32 rounding only)
    assert math.isclose(got[0]["ppl"], rows[0]["ppl"], rel_tol=1e-6)


def test_default_document_is_the_standard_library(tiny_dir):
    text = stdlib_text(10_000)
    assert text.startswith("# file: ") and len(text) >= 10_000
    engine = make_engine(tiny_dir("qwen2", num_key_value_heads=2))
    ids = document_ids(engine.tokenizer, 500)
    assert len(ids) == 500 and ids == document_ids(engine.tokenizer, 500)


def test_ppl_command_records_the_compute_dtype_and_sparse_setting(tiny_dir, tmp_path):
    """`megactx eval ppl` writes what a comparison needs: the dtype (BENCHMARKS.md pairs a sparse run with the
    dense run of the same dtype and DCA settings) and the sparse setting when it applied."""
    import json
    from megactx.commands import main
    path = tiny_dir("qwen2", num_key_value_heads=2)
    for extra, dtype, sparse in ((["--dtype", "fp32"], "float32", False), (["--dtype", "bf16", "--sparse-threshold", "64"],
                                                          "bfloat16", True)):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "ppl", "--model", str(path), "--length", "150", "--bucket", "64", "--out", str(out),
                     "--max-num-batched-tokens", "64", *extra]) == 0
        run = json.loads(out.read_text())
        assert run["dtype"] == dtype and (dtype in run["setting"]) == (dtype != "float32")
        assert (run["sparse"] is not None) == sparse and ("sparse prefill" in run["setting"]) == sparse
        assert [b["tokens"] for b in run["buckets"]] == [63, 64, 22]
