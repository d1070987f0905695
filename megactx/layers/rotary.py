"""Rotary position embeddings (RoFormer, arXiv 2104.09864) with the Hugging Face `rope_scaling` types.

Weights are in HF layout, so rotation is rotate-half: the first and second halves of each head are the pairs.
Types: default, linear (position interpolation), dynamic (NTK-aware, base grows with the sequence length),
yarn (arXiv 2309.00071: per-frequency blend of interpolation and extrapolation, plus an attention factor that
scales cos/sin), llama3 (smooth per-wavelength interpolation).
"""
from __future__ import annotations

import math

import torch

from megactx.config import ModelConfig


def inv_freq_and_scale(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin multiplier, as transformers computes them."""
    dim = config.head_dim
    base = config.rope_theta
    rs = config.rope_scaling or {}
    kind = config.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = rs["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(config, rs, dim, base)
    raise ValueError(f"unsupported rope type {kind}")


def _yarn(config: ModelConfig, rs: dict, dim: int, base: float) -> tuple[torch.Tensor, float]:
    orig = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = rs.get("factor") or config.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin for arbitrary integer positions, computed on the fly (a 1M-position table would be 512 MB)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dynamic = config.rope_type == "dynamic"
        inv_freq, self.scale = inv_freq_and_scale(config)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] int -> cos, sin: [T, head_dim] fp32
        inv_freq = self.inv_freq
        if self.dynamic and seq_len is not None and seq_len > self.config.max_position_embeddings:
            inv_freq = inv_freq_and_scale(self.config, seq_len)[0].to(self.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D], cos/sin: [T, D] (fp32 tables: rounded to x's dtype, as transformers does, so that a bf16
    # model computes in bf16 rather than being promoted to fp32 from here on)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos[:, None, :], rotated, sin[:, None, :])
