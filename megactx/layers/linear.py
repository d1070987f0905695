"""Linear layer whose weight may be stored in half precision while activations stay fp32.

On a CPU, decoding one token per sequence is bound by reading the weights from memory: half-precision
storage halves that traffic (fp16 GEMV measured 2.2x faster than fp32 here). Large batches (prefill chunks) are
bound by arithmetic, where fp32 is the fastest: those upcast the weight and compute in fp32.
With weight dtype == compute dtype (the default, fp32), this is exactly F.linear.

The upcast goes into one reused scratch buffer: `w.to(fp32)` allocates a fresh tensor each call, and on
Linux a large allocation is fresh pages from the kernel every time (measured: 9-34 ms to upcast a
9728x896 weight that way, 0.7 ms by copying into a buffer that is already mapped).

Batched decoding (2-32 rows: one token from each of several sequences) is the gap between the two: torch's
half-precision CPU matmul costs one GEMV per row (8 rows, 8x the time of one), and fp32's small-M GEMM is
not much better. An optional second copy of the weight, fp32 in oneDNN's blocked layout (pack()), serves those
rows: measured here (2 threads, AVX2) for 8 rows, 4.7x faster than fp16 on a 3072x576 weight and 1.8x on
9728x896, and as fast as the fp16 GEMV from 2 rows up. It costs 4 bytes per weight, so it is an engine option.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF_GEMV_MAX_ROWS = 32  # at most this many rows: multiply in the storage dtype (memory bound)
SCRATCH_MAX_ELEMENTS = 16 * 1024 * 1024  # 64 MB of fp32: bigger weights (an LM head) upcast in row blocks

PACK_ROWS_HINT = 8  # the batch size oneDNN tunes the packed layout for (any row count works)

_scratch: dict[tuple, torch.Tensor] = {}
_mkldnn = torch.ops.mkldnn


def packing_available(device: torch.device) -> bool:
    """Whether this torch build can pack weights for oneDNN on this device (CPU builds with mkldnn)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(_mkldnn, "_reorder_linear_weight")


def _scratch_buffer(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, kept between calls (the engine runs one step at a time)."""
    # a buffer made under inference_mode cannot be written outside it: one per mode
    key = (device, dtype, torch.is_inference_mode_enabled())
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=dtype)
        _scratch[key] = buf
    return buf[:numel]


def upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: [T, in] in the compute dtype, w: [out, in] in a storage dtype -> [T, out]
    out_features, in_features = w.shape
    block = max(1, min(out_features, SCRATCH_MAX_ELEMENTS // in_features))
    if block == out_features:
        w32 = _scratch_buffer(w.numel(), x.device, x.dtype).view(out_features, in_features).copy_(w)
        return F.linear(x, w32)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, block):
        part = w[start:start + block]
        w32 = _scratch_buffer(part.numel(), x.device, x.dtype).view(part.shape).copy_(part)
        out[:, start:start + block] = F.linear(x, w32)
    return out


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # fp32 copy in oneDNN's layout for 2..32 rows (pack())

    @torch.no_grad()
    def pack(self) -> int:
        """Keep an fp32 copy of the weight packed for oneDNN's small-batch GEMM; returns its size in bytes."""
        self.packed = _mkldnn._reorder_linear_weight(self.weight.detach().float(), PACK_ROWS_HINT)
        return self.weight.numel() * 4

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        # x: [T, in] -> [T, out] in x's dtype; rows: only these output features (a view of the weight, no copy)
        w, bias = self.weight, self.bias
        if rows is not None:
            w, bias = w[rows], (None if bias is None else bias[rows])
        elif self.packed is not None and 1 < x.shape[0] <= HALF_GEMV_MAX_ROWS and x.dtype == torch.float32:
            b = None if bias is None else bias.float()  # a no-op for the model's biases, kept in fp32
            return _mkldnn._linear_pointwise(x.contiguous(), self.packed, b, "none", [], "")
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        if x.shape[0] <= HALF_GEMV_MAX_ROWS:
            out = F.linear(x.to(w.dtype), w).to(x.dtype)
        else:
            out = upcast_linear(x, w)
        return out if bias is None else out + bias.to(x.dtype)
