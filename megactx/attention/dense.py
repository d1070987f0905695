"""Dense attention with log-sum-exp, the building block of every attention path.

Layouts: queries grouped by their KV head, q: [Hkv, G, n, D]; keys and values k, v: [Hkv, m, D]
(G = query heads per KV head; query head h = kv * G + g, as transformers' repeat_kv).

Fast path on CPU: torch's flash-attention CPU kernel, which returns (out, lse). Non-causal calls fold the
G query heads into the query dimension, so keys are read in place (no GQA copy of a long cache).
Reference path: explicit scores and softmax; the tests use it as the oracle, other devices fall back to it.
"""
from __future__ import annotations

import torch

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [Hkv, G, n, D], k/v: [Hkv, m, D], mask: [n, m] bool (True = attend) or None
    scores = torch.einsum("hgnd,hmd->hgnm", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, n]
    probs = torch.exp(scores - lse.unsqueeze(-1).nan_to_num(neginf=0.0)).nan_to_num(0.0)
    out = torch.einsum("hgnm,hmd->hgnd", probs, v.float())
    return out.to(q.dtype), lse


def causal_mask(n: int, m: int, device=None) -> torch.Tensor:
    """[n, m] bool: query i (the i-th of the last n positions) sees keys up to m - n + i (bottom-right)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v; causal needs n == m (the chunk attending to itself).

    Returns out [Hkv, G, n, D] and lse [Hkv, G, n] fp32.
    """
    hkv, g, n, d = q.shape
    m = k.shape[1]
    if m == 0:
        return torch.zeros_like(q), torch.full((hkv, g, n), float("-inf"), device=q.device)
    if causal and n != m:
        raise ValueError(f"causal attention needs as many queries as keys, got {n} and {m}")
    if _flash_cpu is None or q.device.type != "cpu":
        return reference_attention(q, k, v, scale, causal_mask(n, m, q.device) if causal else None)
    if not causal:
        # fold G into the query dim: [1, Hkv, G*n, D] against [1, Hkv, m, D] -- no copy of k/v
        out, lse = _flash_cpu(q.reshape(1, hkv, g * n, d), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale)
        return out.view(hkv, g, n, d), lse.view(hkv, g, n)
    # causal: each query head needs its own key rows; the chunk is short, so the GQA copy is cheap
    kx = k.unsqueeze(1).expand(hkv, g, m, d).reshape(1, hkv * g, m, d)
    vx = v.unsqueeze(1).expand(hkv, g, m, d).reshape(1, hkv * g, m, d)
    out, lse = _flash_cpu(q.reshape(1, hkv * g, n, d), kx, vx, 0.0, True, scale=scale)
    return out.view(hkv, g, n, d), lse.view(hkv, g, n)
