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


# non-causal calls of n x 3 <= PACK_ROWS rows a KV head run packed (dense.py), of more rows as they are
@pytest.mark.parametrize("causal,n,m", [(True, 33, 33), (False, 1, 50), (False, 17, 40), (False, 30, 40)])
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


def test_merging_bf16_parts_accumulates_in_fp32():
    # the parts as a bf16 model computes them; the merge reads them without converted copies, accumulates in
    # fp32 and rounds once: the result is the fp32 merge of the same values, rounded to bf16, bit for bit
    q, k, v = qkv(9, 60, seed=2)
    parts = [attention(q, k[:, a:b], v[:, a:b], 0.3, causal=False) for a, b in ((0, 7), (7, 30), (30, 31), (31, 60))]
    outs, lses = [p[0].bfloat16() for p in parts], [p[1] for p in parts]
    out, lse = merge_attention(outs, lses)
    ref_out, ref_lse = merge_attention([o.float() for o in outs], lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, ref_out.bfloat16()) and torch.equal(lse, ref_lse)


def test_attention_probe_gives_transformers_attention_weights(tiny_dir):
    """The probe's last prompt row, per layer: the softmax transformers' eager attention returns."""
    from transformers import AutoModelForCausalLM
    from megactx.attention.attention_probe import AttentionProbe
    from helpers import engine_logits, make_engine, token_ids
    path = tiny_dir("qwen2")
    ids = token_ids(40)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        weights = model(torch.tensor([ids]), output_attentions=True).attentions  # layers x [1, H, T, T]
    engine = make_engine(path, chunk=16)  # the row's step reads the earlier keys from the cache
    probe = AttentionProbe(positions=[0, 5, 6], keep_probs=True)
    engine.observe_attention(probe)
    engine_logits(engine, ids)
    assert len(probe.probs) == len(weights)
    for layer, w in enumerate(weights):
        torch.testing.assert_close(probe.probs[layer], w[0, :, -1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probe.mass[layer], w[0, :, -1, [0, 5, 6]].sum(-1), atol=1e-5, rtol=1e-4)
