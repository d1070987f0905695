"""Log-sum-exp merge of attention computed over disjoint key sets.

If part p gives O_p = softmax(S_p) V_p and lse_p = logsumexp(S_p), then attention over all keys is
O = sum_p exp(lse_p - LSE) O_p with LSE = logsumexp_p(lse_p). An empty part has lse = -inf and O = 0.
Chunked prefill (earlier keys + the chunk itself), Dual Chunk Attention (intra/successive/inter) and
sparse prefill all combine their parts with this.
"""
from __future__ import annotations

import torch


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor],
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # outs: P x [..., D], lses: P x [...] (out's shape without D) -> out [..., D] (out_dtype, default the dtype
    # of outs[0]), lse [...] fp32. out_dtype fp32 keeps a partial result that is merged again unrounded
    dtype = out_dtype or outs[0].dtype
    if len(outs) == 1:
        return outs[0].to(dtype), lses[0]
    lse = torch.stack(lses).float()  # [P, ...]: the parts' lse are fp32 already (no copy then)
    total = torch.logsumexp(lse, dim=0)
    # all parts empty for a row -> total = -inf; subtract 0 there so that its weights are exp(-inf) = 0, not NaN
    weights = (lse - total.nan_to_num(neginf=0.0)).exp_().unsqueeze_(-1)
    # accumulated in fp32 in place, part by part: type promotion reads bf16 parts without a converted copy
    out = outs[0] * weights[0]
    for w, o in zip(weights[1:], outs[1:]):
        out.addcmul_(o, w)
    return out.to(dtype), total
