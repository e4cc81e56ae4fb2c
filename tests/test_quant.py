"""Weight-quantized linears: close to fp32 within each format's expected error, and the module swap."""
import pytest
import torch
from torch import nn

from treespec.models.lm_head import fp16_ops_available
from treespec.models.quant import QuantLinear, WeightQuant, quantize_int8_rows, quantize_linears

pytestmark = pytest.mark.skipif(not fp16_ops_available(), reason="fbgemm ops not in this torch build")

# relative Frobenius error vs fp32 on Gaussian data, measured ~2e-4 (fp16 weight rounding) and ~1.5e-2 (int8
# weights and 7-bit per-row activations)
TOLERANCE = {WeightQuant.FP16: 5e-4, WeightQuant.INT8: 3e-2}


class TinyBlock(nn.Module):
    """Stands in for a transformer layer: nested Linears (with and without bias), a shared one, a non-Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(48)
        self.attn = nn.ModuleDict({"q": nn.Linear(48, 64, bias=False), "o": nn.Linear(64, 48)})
        self.mlp = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48))
        self.tied = self.mlp[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 48]
        y = x + self.attn["o"](self.attn["q"](self.norm(x)))
        return y + self.mlp(y) + self.tied(y)[..., :48]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", [WeightQuant.FP16, WeightQuant.INT8])
@pytest.mark.parametrize("t", [1, 4, 16])
def test_quant_linear_close_to_fp32(kind, t):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384)
    x = torch.randn(t, 256)
    q = QuantLinear(lin, kind)
    with torch.no_grad():
        want = lin(x)
    got = q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert 0 < rel_err(got, want) < TOLERANCE[kind]


@pytest.mark.parametrize("kind", [WeightQuant.FP16, WeightQuant.INT8])
def test_a_rows_result_does_not_depend_on_the_other_rows(kind):
    """Lossless speculation: a tree's rows go through one call; row 5 is an outlier (50x) that a per-call int8
    activation scale would spread to every other row."""
    torch.manual_seed(4)
    q = QuantLinear(nn.Linear(640, 384), kind)
    x = torch.randn(64, 640)
    x[5] *= 50.0
    together = q(x)
    for t in range(64):
        assert torch.equal(q(x[t:t + 1])[0], together[t])
    for lo, hi in ((0, 2), (0, 5), (3, 17), (6, 64)):
        assert torch.equal(q(x[lo:hi]), together[lo:hi])


def test_int8_rows_keep_their_own_accuracy_next_to_an_outlier():
    torch.manual_seed(5)
    lin = nn.Linear(256, 128)
    x = torch.randn(8, 256)
    x[0] *= 1000.0
    with torch.no_grad():
        want = lin(x)
    got = QuantLinear(lin, WeightQuant.INT8)(x)
    for t in range(8):
        assert rel_err(got[t], want[t]) < TOLERANCE[WeightQuant.INT8]


@pytest.mark.parametrize("k", [1, 7, 640, 2051])
def test_row_scale_matches_its_twin(k):
    from treespec.kernels.row_scale import normalize_rows, reference_normalize_rows
    x = torch.randn(5, k) * torch.tensor([1.0, 1e-3, 0.0, 1e4, -2.0])[:, None]
    got, want = normalize_rows(x, 1e-30), reference_normalize_rows(x, 1e-30)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].abs().amax(dim=1)[[0, 1, 3, 4]].eq(1.0).all()


def test_int8_zero_rows_give_the_bias():
    lin = nn.Linear(32, 16)
    got = QuantLinear(lin, WeightQuant.INT8)(torch.zeros(3, 32))
    assert torch.equal(got, lin.bias.detach().expand(3, 16))


def test_fp16_error_is_the_weight_rounding_alone():
    """FP16 keeps fp32 activations: its output equals fp32 math on the fp16-rounded weights."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    x = torch.randn(5, 128)
    rounded = lin.weight.detach().half().float()
    want = x.double() @ rounded.double().T + lin.bias.detach().double()
    torch.testing.assert_close(QuantLinear(lin, WeightQuant.FP16)(x).double(), want, atol=1e-5, rtol=1e-5)


def test_int8_rows_are_symmetric_per_channel():
    w = torch.randn(6, 40)
    w[2] = 0.0
    q = quantize_int8_rows(w)
    assert torch.equal(q.q_per_channel_zero_points(), torch.zeros(6, dtype=torch.long))
    assert q.int_repr().abs().amax(dim=1)[[0, 1, 3, 4, 5]].eq(127).all()
    torch.testing.assert_close(q.dequantize(), w, atol=float(w.abs().max() / 254) + 1e-7, rtol=0)


@pytest.mark.parametrize("kind", [WeightQuant.FP16, WeightQuant.INT8])
def test_quantize_linears_swaps_every_linear(kind):
    torch.manual_seed(2)
    block = TinyBlock()
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        want = block(x)
    assert quantize_linears(block, kind) == 4  # q, o, mlp.0 (also reached as .tied), mlp.2
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert block.tied is block.mlp[0] and isinstance(block.norm, nn.LayerNorm)
    with torch.no_grad():
        got = block(x)
    assert got.shape == want.shape and rel_err(got, want) < TOLERANCE[kind]


def test_none_leaves_model_untouched():
    block = TinyBlock()
    assert quantize_linears(block, WeightQuant.NONE) == 0
    assert isinstance(block.attn["q"], nn.Linear)


@pytest.mark.parametrize("kind", [WeightQuant.FP16, WeightQuant.INT8])
def test_quantized_copy_leaves_the_original_and_shares_the_rest(kind):
    """The self-draft's twin: the original keeps its fp32 Linears (and a oneDNN-packed copy is not carried over),
    the twin's Linears are quantized, its other parameters are the original's tensors, and it computes the same."""
    from treespec.models.layers import Linear
    from treespec.models.quant import quantized_copy
    torch.manual_seed(3)
    block = TinyBlock()
    packed = Linear(48, 48)
    packed.weight.data.normal_()
    packed.pack()
    block.extra = packed
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        want = block(x)
    twin = quantized_copy(block, kind)
    assert isinstance(block.attn["q"], nn.Linear) and block.extra.packed is packed.packed
    assert isinstance(twin.attn["q"], QuantLinear) and isinstance(twin.extra, QuantLinear)
    assert twin.tied is twin.mlp[0] and twin.norm.weight is block.norm.weight
    with torch.no_grad():
        got = twin(x)
    assert rel_err(got, want) < TOLERANCE[kind]
