"""Dense attention (fast path) against the naive reference, and the log-sum-exp merge."""
import pytest
import torch

from megactx.attention.dense import attention, causal_mask, reference_attention
from megactx.attention.merge import merge_attention


def qkv(n, m, h=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g)
    k = torch.randn(m, hkv, d, generator=g).transpose(0, 1)  # [Hkv, m, D] strided, as cache views are
    v = torch.randn(m, hkv, d, generator=g).transpose(0, 1)
    return q, k, v


@pytest.mark.parametrize("causal,n,m", [(True, 33, 33), (False, 1, 50), (False, 17, 40)])
def test_fast_path_equals_reference_with_gqa(causal, n, m):
    q, k, v = qkv(n, m)
    out, lse = attention(q, k, v, 0.25, causal)
    ref_out, ref_lse = reference_attention(q, k, v, 0.25, causal_mask(n, m) if causal else None)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merging_parts_equals_one_softmax_over_all_keys():
    q, k, v = qkv(9, 60, seed=1)
    whole = reference_attention(q, k, v, 0.3)
    parts = [attention(q, k[:, a:b], v[:, a:b], 0.3, causal=False) for a, b in ((0, 10), (10, 10), (10, 60))]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])  # includes an empty part
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)
