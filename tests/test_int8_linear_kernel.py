"""chatkv's int8 linear kernel (the quantized output head of a decode step): the dequantized product, and
each row's output independent of the rows beside it, which speculative decoding's exactness rests on."""

from __future__ import annotations

import pytest
import torch

from chatkv import kernels
from chatkv.model.lean_llama import Linear, quantize_int8


@pytest.fixture(scope="module")
def int8_linear():
    reason = kernels.load()
    if reason is not None or not torch.ops.chatkv.int8_linear_supported(576):
        pytest.skip(f"chatkv's CPU kernels are not available here: {reason or 'no AVX-512'}")
    return torch.ops.chatkv.int8_linear


def weights(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(out_features + in_features)
    return quantize_int8(torch.randn(out_features, in_features, generator=generator) * 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(49152, 576), (1003, 1536), (5, 16)])
def test_equals_the_dequantized_product(int8_linear, dtype, out_features, in_features):
    tensors = weights(out_features, in_features)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    dense = tensors["q"].float() * tensors["scales"][:, None]
    expected = x.float() @ dense.T
    got = int8_linear(x, tensors["q"], tensors["scales"])
    assert got.dtype == dtype and got.shape == (3, out_features)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_what_it_would_be_alone(int8_linear, dtype):
    tensors = weights(2051, 576)  # an odd width: the last tile is partial
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(2)).to(dtype)
    alone = torch.cat([int8_linear(x[i : i + 1], tensors["q"], tensors["scales"]) for i in range(8)])
    for rows in range(1, 9):
        assert torch.equal(int8_linear(x[:rows], tensors["q"], tensors["scales"]), alone[:rows]), f"{rows} rows"


def test_refuses_what_it_does_not_serve(int8_linear):
    tensors = weights(64, 576)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        int8_linear(torch.randn(9, 576), tensors["q"], tensors["scales"])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        int8_linear(torch.randn(1, 576).half(), tensors["q"], tensors["scales"])
    with pytest.raises(RuntimeError, match="inputs"):
        int8_linear(torch.randn(1, 512), tensors["q"], tensors["scales"])
    assert not torch.ops.chatkv.int8_linear_supported(100)


def test_an_int8_linear_uses_it_for_a_few_rows_and_the_dense_weights_beyond(int8_linear):
    tensors = weights(300, 576)
    linear = Linear("int8", torch.float32, **tensors)
    few, many = torch.randn(2, 576), torch.randn(12, 576)
    assert torch.equal(linear(few), int8_linear(few, tensors["q"], tensors["scales"]))
    assert torch.equal(linear(many), many @ linear.dense.T)
