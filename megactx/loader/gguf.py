"""GGUF files (llama.cpp's format): metadata -> ModelConfig (gguf_header.py reads it), tensors dequantized with the
`gguf` package.

llama.cpp's converter permutes the rows of llama's q and k weights (interleaved rotary pairs); we undo it so
the weights are in Hugging Face layout and one rotary implementation (rotate-half) serves every source.
Qwen2 is stored unpermuted (llama.cpp treats it as NEOX rotary).
"""
from __future__ import annotations

import re

import numpy as np
import torch

from megactx.config import ModelConfig
from megactx.errors import ModelLoadError
from megactx.loader.gguf_header import GGUFHeader, read_header

ARCHS = ("llama", "qwen2")
_LAYER_MAP = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        part = _LAYER_MAP.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    part = _GLOBAL_MAP.get(base)
    return None if part is None else f"{part}.{kind}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf permute(): interleaved rotary pairs -> rotate-half layout."""
    # forward: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(shape)
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_gguf(path: str) -> GGUFHeader:
    try:
        return read_header(path)
    except Exception as e:  # ValueError / struct.error / UnicodeError on a file that is not a whole GGUF
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def config_from_metadata(meta: dict, tensor_names: set[str], path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ModelLoadError(f"{path}: unknown GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")

    def get(key, default=None, required=True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size", required=False)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens)
    rope_scaling = None
    scaling_type = get("rope.scaling.type", required=False)
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        orig = get("rope.scaling.original_context_length", required=False)
        if orig:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", None, required=False) or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(t) for t in dict.fromkeys(x for x in (eos, eot) if x is not None)],
    )


def dequantize_rows(data: np.ndarray, qtype, dequantize, chunk_rows: int = 8192) -> np.ndarray:
    """gguf's dequantize in blocks of rows: on a whole 150K-row embedding its numpy temporaries take several
    times the fp32 result (measured: 1.3 GB more peak memory loading a 0.5B model)."""
    if data.ndim < 2 or data.shape[0] <= chunk_rows:
        return dequantize(data, qtype)
    first = dequantize(data[:chunk_rows], qtype)
    out = np.empty((data.shape[0],) + first.shape[1:], dtype=first.dtype)
    out[:chunk_rows] = first
    for start in range(chunk_rows, data.shape[0], chunk_rows):
        out[start:start + chunk_rows] = dequantize(data[start:start + chunk_rows], qtype)
    return out


def open_gguf(path: str):
    from megactx.loader import ModelSource
    header = read_gguf(path)
    tensors = {t.name: t for t in header.tensors}
    config = config_from_metadata(header.fields, set(tensors), path)
    names = {n for n in (hf_name(k) for k in tensors) if n is not None}

    def iter_weights():
        from gguf import GGMLQuantizationType, dequantize
        for name, t in tensors.items():
            target = hf_name(name)
            if target is None:
                continue
            data = np.asarray(t.data)
            if t.tensor_type == GGMLQuantizationType.F32:
                arr = np.array(data, dtype=np.float32)  # copy: the memmap is read-only
            else:
                try:
                    arr = dequantize_rows(data, t.tensor_type, dequantize)
                except NotImplementedError:
                    raise ModelLoadError(f"{path}: tensor {name} has type {t.tensor_type.name}, "
                                         "which the gguf package cannot dequantize") from None
            if config.architecture == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
                arr = unpermute_qk(arr, config.num_attention_heads)
            elif config.architecture == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
                arr = unpermute_qk(arr, config.num_key_value_heads)
            yield target, torch.from_numpy(np.ascontiguousarray(arr))
            del arr, data  # before dequantizing the next tensor: one fp32 tensor alive at a time

    full = {"F32", "F16", "BF16", "F64"}
    quantized = any(t.tensor_type.name not in full for t in header.tensors)
    return ModelSource(path=path, format="gguf", config=config, iter_weights=iter_weights, weight_names=names,
                       quantized=quantized)

