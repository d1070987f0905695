"""Half-stored weights: the fp32 upcast path (scratch buffer, row blocks) equals F.linear on the upcast weight."""
import pytest
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


needs_onednn = pytest.mark.skipif(not linear.packing_available(torch.device("cpu")),
                                  reason="this torch build has no oneDNN weight packing")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_weight_serves_small_batches_and_equals_the_fp32_product(dtype):
    layer = _layer(300, 64, bias=True, dtype=dtype)
    assert layer.pack() == 300 * 64 * 4
    w, b = layer.weight.float(), layer.bias.float()
    for rows in (1, 2, 8, 32, 33):  # 2..32 rows take the packed copy; 1 and 33 the other paths
        x = torch.randn(rows, 64)
        tol = dict(atol=2e-2, rtol=2e-3) if dtype == torch.float16 and rows == 1 else dict(atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), **tol)
    with torch.inference_mode():  # as the engine calls it
        x = torch.randn(8, 64)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
