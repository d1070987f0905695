"""Logits equal transformers' (the oracle) for tiny random Llama and Qwen2 checkpoints, HF and GGUF."""
import os

import gguf
import pytest
import torch

from conftest import GGUF_VOCAB, hf_forward, write_gguf
from helpers import engine_logits, make_engine, token_ids

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("arch,tie,kv_heads", [("llama", False, 2), ("llama", True, 4), ("qwen2", False, 2),
                                                ("qwen2", True, 1)])
def test_safetensors_logits_match_transformers(tiny_dir, arch, tie, kv_heads):
    path = tiny_dir(arch, tie=tie, num_key_value_heads=kv_heads)
    ids = token_ids(48)
    ref = hf_forward(path, ids)
    got = engine_logits(make_engine(path), ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope_scaling,max_pos", [
    ({"rope_type": "linear", "factor": 2.0}, 512),
    ({"rope_type": "dynamic", "factor": 2.0}, 64),  # 100 tokens > 64: the NTK base actually grows
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 64),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 512),
])
def test_rope_scaling_matches_transformers(tiny_dir, rope_scaling, max_pos):
    path = tiny_dir("llama", rope_scaling=rope_scaling, max_position_embeddings=max_pos)
    ids = token_ids(100, seed=1)
    ref = hf_forward(path, ids)
    got = engine_logits(make_engine(path), ids, chunk=128)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,qtype", [("llama", Q.F32), ("llama", Q.Q8_0), ("llama", Q.Q4_0), ("qwen2", Q.F32),
                                         ("qwen2", Q.F16), ("qwen2", Q.Q5_1)])
def test_gguf_logits_match_transformers_on_the_same_file(tiny_dir, tmp_path, arch, qtype):
    src = tiny_dir(arch, vocab_size=GGUF_VOCAB)
    path = write_gguf(str(tmp_path / f"tiny-{arch}-{qtype.name}.gguf"), src, arch, qtype)
    ids = token_ids(40, seed=2, high=GGUF_VOCAB)
    ref = hf_forward(str(tmp_path), ids, gguf_file=os.path.basename(path))
    got = engine_logits(make_engine(path), ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if qtype == Q.F32:  # and F32 GGUF equals the safetensors checkpoint it came from
        torch.testing.assert_close(got, hf_forward(src, ids), atol=1e-4, rtol=1e-4)


def test_gguf_qk_unpermute_is_the_inverse_of_llama_cpp_permute():
    import numpy as np
    from megactx.loader.gguf import unpermute_qk
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = w.reshape(8, 2, 8, 3).swapaxes(1, 2).reshape(w.shape)  # llama.cpp, n_head = 8
    assert (unpermute_qk(permuted, 8) == w).all()
    assert not (permuted == w).all()
