"""Fixtures: tiny random Llama / Qwen2 checkpoints written as safetensors (by transformers) and as GGUF
(by gguf.GGUFWriter), plus the bundled SmolLM2. Nothing here touches the network."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

VOCAB = 49152  # SmolLM2's tokenizer is reused by the tiny checkpoints
GGUF_VOCAB = 512  # the tiny GGUF files' vocabulary: SmolLM2's first tokens (add_smollm2_tokenizer)


def tiny_config(arch: str = "llama", tie: bool = False, rope_scaling: dict | None = None, **over) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if rope_scaling:
        cfg["rope_scaling"] = rope_scaling
    cfg.update(over)
    return cfg


def make_hf_model(arch: str, cfg: dict, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    model = cls[1](cls[0](**cfg)).eval()
    with torch.no_grad():  # larger-than-default weights so that differences show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in str(p.shape) or p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from megactx.loader import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2_dir(tmp_path_factory, smollm2_path) -> str:
    """The oracle for the bundled SmolLM2: transformers' own reading of its GGUF file, saved as safetensors once for
    every test worker (transformers takes seconds to parse the GGUF's 49,152 token strings on each load)."""
    from filelock import FileLock
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "hf-smollm2"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "config.json").exists():
            folder, name = os.path.split(smollm2_path)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            shared.mkdir()  # a GGUF-loaded model refuses save_pretrained: its weights and config, saved apart
            save_model(model, str(shared / "model.safetensors"))
            model.config.save_pretrained(str(shared))
    return str(shared)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_path) -> str:
    from megactx.loader.tokenizer import load_tokenizer
    d = str(tmp_path_factory.mktemp("tok"))
    load_tokenizer(smollm2_path).hf.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """Factory: tiny_dir(arch, tie=False, rope_scaling=None, **config) -> directory of a random checkpoint."""
    import shutil
    made: dict = {}

    def make(arch: str = "llama", tie: bool = False, rope_scaling: dict | None = None, **over) -> str:
        key = json.dumps([arch, tie, rope_scaling, over], sort_keys=True)
        if key not in made:
            d = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            make_hf_model(arch, tiny_config(arch, tie, rope_scaling, **over)).save_pretrained(d)
            for f in os.listdir(smollm2_tokenizer_dir):
                shutil.copy(os.path.join(smollm2_tokenizer_dir, f), d)
            made[key] = d
        return made[key]
    return make


def hf_forward(path: str, ids: list[int], gguf_file: str | None = None) -> torch.Tensor:
    """Oracle: transformers' logits [T, V] in fp32 with sdpa attention."""
    from transformers import AutoModelForCausalLM
    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


_TOKENIZER_FIELDS: dict = {}


def add_smollm2_tokenizer(w, vocab_size: int | None = None) -> None:
    """Copy SmolLM2's tokenizer metadata (GPT-2 BPE, 49,152 tokens, chat template) into a GGUF being written.
    With `vocab_size` below that, its first tokens and the merges among them: gguf's own reader (the tests' oracle)
    parses every token string one by one, so a 512-token file opens in a fraction of a second instead of seconds."""
    if not _TOKENIZER_FIELDS:
        from megactx.loader import default_model_path
        from megactx.loader.gguf_header import read_header
        f = read_header(default_model_path()).fields
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.pre", "tokenizer.chat_template"):
            _TOKENIZER_FIELDS[key] = f[key].tolist() if hasattr(f[key], "tolist") else f[key]
    t = _TOKENIZER_FIELDS
    tokens, types, merges = t["tokenizer.ggml.tokens"], t["tokenizer.ggml.token_type"], t["tokenizer.ggml.merges"]
    if vocab_size is not None and vocab_size < len(tokens):
        tokens, types = tokens[:vocab_size], types[:vocab_size]
        kept = set(tokens)
        merges = [m for m in merges if all(part in kept for part in m.split(" ")) and m.replace(" ", "") in kept]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(t["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(t["tokenizer.chat_template"])


def write_gguf(path: str, hf_dir: str, arch: str, qtype) -> str:
    """Write the checkpoint in hf_dir as a GGUF file the way llama.cpp's converter does (q/k permuted for llama)."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    add_smollm2_tokenizer(w, cfg["vocab_size"])
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in sd.items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gname = f"blk.{i}.{layer[rest]}.{kind}"
        else:
            gname = f"{names[base]}.{kind}"
        a = t.float().numpy()
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            n_head = cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"]
            a = a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def dca_model(tiny_dir, tmp_path_factory):
    """A tiny Qwen2 checkpoint whose config.json carries Qwen2.5-1M's dual_chunk_attention_config block: chunk 48,
    local 8 (chunk length 40)."""
    src = tiny_dir("qwen2", num_key_value_heads=2)
    d = str(tmp_path_factory.mktemp("tiny-dca"))
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["dual_chunk_attention_config"] = {"chunk_size": 48, "local_size": 8, "original_max_position_embeddings": 48}
    cfg["max_position_embeddings"] = 4096
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d
