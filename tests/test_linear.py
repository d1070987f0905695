"""Half-stored weights: the fp32 upcast path (scratch buffer, row blocks) equals F.linear on the upcast weight."""
import torch
import torch.nn.functional as F

from megactx.layers import linear
from megactx.layers.linear import Linear


def _layer(out_features, in_features, bias, dtype):
    layer = Linear(in_features, out_features, bias=bias)
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features))
        if bias:
            layer.bias.copy_(torch.randn(out_features))
    return layer.to(dtype)


def test_upcast_matches_reference_in_one_block_and_in_row_blocks(monkeypatch):
    layer = _layer(300, 64, bias=True, dtype=torch.float16)
    x = torch.randn(80, 64)  # more than HALF_GEMV_MAX_ROWS rows: the upcast path
    expected = F.linear(x, layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(layer(x), expected)
    monkeypatch.setattr(linear, "SCRATCH_MAX_ELEMENTS", 64 * 7)  # blocks of 7 rows, the last one short
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x, rows=slice(10, 150)), expected[:, 10:150])


def test_gemv_path_and_fp32_path():
    x = torch.randn(3, 64)
    half = _layer(50, 64, bias=False, dtype=torch.bfloat16)
    expected = F.linear(x.to(torch.bfloat16), half.weight).float()
    torch.testing.assert_close(half(x), expected)
    full = _layer(50, 64, bias=True, dtype=torch.float32)
    assert torch.equal(full(x), F.linear(x, full.weight, full.bias))
