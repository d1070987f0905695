"""Dense attention with log-sum-exp, the building block of every attention path.

Layouts: queries token-major, q: [n, H, D] (as the projection produces them); keys and values head-major,
k, v: [Hkv, m, D] (the KV cache layout; any strides). Query head h reads KV head h // G, G = H / Hkv, as
transformers' repeat_kv. Returns out [n, H, D] and lse [n, H] (fp32), aligned for merge_attention.

Fast path on CPU: torch's flash-attention CPU kernel, which returns the log-sum-exp, takes strided inputs and
handles GQA natively, so neither the queries nor a long cache are copied.
Reference path: explicit scores and softmax; the tests use it as the oracle, other devices fall back to it.
"""
from __future__ import annotations

import torch

flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [n, H, D], k/v: [Hkv, m, D], mask: [n, m] bool (True = attend) or None
    n, h, d = q.shape
    hkv = k.shape[0]
    qg = q.float().view(n, hkv, h // hkv, d)
    scores = torch.einsum("nkgd,kmd->kgnm", qg, k.float()) * scale  # [Hkv, G, n, m]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, n]
    probs = torch.exp(scores - lse.unsqueeze(-1).nan_to_num(neginf=0.0)).nan_to_num(0.0)
    out = torch.einsum("kgnm,kmd->nkgd", probs, v.float()).reshape(n, h, d)
    return out.to(q.dtype), lse.reshape(h, n).t()


def causal_mask(n: int, m: int, device=None) -> torch.Tensor:
    """[n, m] bool: query i (the i-th of the last n positions) sees keys up to m - n + i (bottom-right)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v; causal needs n == m (a chunk attending to itself)."""
    n, h, d = q.shape
    m = k.shape[1]
    if m == 0:
        return torch.zeros_like(q), torch.full((n, h), float("-inf"), device=q.device)
    if causal and n != m:
        raise ValueError(f"causal attention needs as many queries as keys, got {n} and {m}")
    if flash_cpu is None or q.device.type != "cpu":
        return reference_attention(q, k, v, scale, causal_mask(n, m, q.device) if causal else None)
    # [1, H, n, D] views of the token-major queries; out comes back as [1, H, n, D] over [n, H, D] memory
    out, lse = flash_cpu(q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale)
    return out[0].transpose(0, 1), lse[0].t()
