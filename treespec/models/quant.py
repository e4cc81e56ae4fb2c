"""Opt-in quantized replacements for the transformer's `nn.Linear` layers (approximate: not exact vs fp32).

Why: batch-1 decode reads every weight once per step, so fewer weight bytes mean faster steps. Measured on this
2-core AVX2 CPU over Gemma-3-270M-shaped layers (18 layers, 7 matmuls each, DRAM-bound), ms per pass:

    T (rows)        1     4    16    64
    fp32 F.linear  32    46    49   101
    fp32 mm(W,x^T) 32    21    41    90
    FP16 (fbgemm)   9     9    21    70    fp16 weights, fp32 activations and accumulation: error ~1e-3 relative
    INT8 (fbgemm)   6     7    10    26    int8 per-channel weights, activations quantized to 7-bit uint8
    int8pack bf16   8    12    32   102    (_weight_int8pack_mm: AVX2 only for bf16; not used)

FP16 keeps fp32 activations, so its error is the weights' fp16 rounding alone. INT8 is the fastest at every T.
It quantizes each row of activations with that row's own scale (its max |x|), not one scale per call: with one
scale a tree's rows changed each other's numbers (an outlier row coarsened all the others), so speculative int8
output differed from plain int8 output; per row it cannot, and no row pays for another's outlier. Measured cost
over Gemma 3 270M's body (72 fused projections, 2 threads), per-call scale -> per-row scale, ms per step:
1 row 5.7 -> 6.1, 4 rows 5.6 -> 6.2, 16 rows 8.7 -> 9.8, 64 rows 22.8 -> 24.8 (kernels/row_scale.py; in torch
ops the row maxima and divisions cost 2.5x more).
The fp16 LM head screen in lm_head.py is separate and exact; these modules are not.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from treespec.config import WeightQuantization
from treespec.kernels.row_scale import normalize_rows

WeightQuant = WeightQuantization  # NONE / FP16 / INT8; one Enum shared with EngineConfig.weight_quantization
_MIN_SCALE = 1e-12                # per-channel int8 scale for all-zero rows (any positive value is exact there)
# activations: a row divided by its max |x| lies in [-1, 1] -> uint8 codes 1..127 (x / (1/63) + 64). 7 bits keep
# AVX2's u8 x s8 pair sums (vpmaddubsw) from saturating int16, as linear_dynamic's reduce_range does.
_ROW_SCALE, _ROW_ZERO = 1.0 / 63.0, 64
_TINY = 1e-30                     # the max |x| of an all-zero row (any positive value gives codes of 0.0)


class QuantLinear(nn.Module):
    """y = x W^T + b through an fbgemm-packed weight; accepts any leading shape like nn.Linear."""

    def __init__(self, linear: nn.Linear, kind: WeightQuantization) -> None:
        super().__init__()
        if kind not in (WeightQuantization.FP16, WeightQuantization.INT8):
            raise ValueError(f"QuantLinear needs FP16 or INT8, got {kind.name}")
        self.kind = kind
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        if kind is WeightQuantization.FP16:
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
            self.weight_nbytes = weight.numel() * 2
        else:  # the bias is added after the per-row rescale, so it is not packed
            self.packed = torch.ops.quantized.linear_prepack(quantize_int8_rows(weight), None)
            self.weight_nbytes = weight.numel() + 4 * weight.shape[0]
        self.bias = bias if kind is WeightQuantization.INT8 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():  # decoding's case, without reshapes
            return self._linear(x)
        flat = x.reshape(-1, self.in_features).float().contiguous()
        return self._linear(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _linear(self, flat: torch.Tensor) -> torch.Tensor:  # flat: [T, in] fp32 contiguous -> [T, out]
        if self.kind is WeightQuantization.FP16:
            return torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        return int8_rows_linear(flat, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind.name}"


def int8_rows_linear(x: torch.Tensor, packed: torch.ScriptObject,
                     bias: torch.Tensor | None) -> torch.Tensor:  # x: [T, in] fp32 contiguous -> [T, out]
    """x W^T + b with each row of x quantized on its own scale: a row's result never depends on the other rows."""
    unit, amax = normalize_rows(x, _TINY)                                                   # [T, in], [T, 1]
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(unit, _ROW_SCALE, _ROW_ZERO, packed)
    return y.mul_(amax) if bias is None else torch.addcmul(bias, y, amax)


def quantize_int8_rows(weight: torch.Tensor) -> torch.Tensor:  # weight: [N, K] fp32 -> [N, K] qint8
    """Symmetric per-output-channel int8 (scale = max|w| / 127, zero point 0), as fbgemm's packer wants."""
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(_MIN_SCALE).double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # qint8 tensors are deprecated in 2.13, but fbgemm's packer still takes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)


def quantize_linears(model: nn.Module, kind: WeightQuantization) -> int:
    """Replace every nn.Linear submodule of `model` in place; returns how many distinct ones were replaced.

    Modules that are not nn.Linear (embeddings, norms, the LM head, which owns its own exact fp16 screen) stay."""
    if kind is WeightQuantization.NONE:
        return 0
    swapped: dict[int, QuantLinear] = {}  # a Linear shared under two names becomes one shared QuantLinear
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear) and name]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if id(linear) not in swapped:
            swapped[id(linear)] = QuantLinear(linear, kind)
        setattr(parent, child, swapped[id(linear)])
    return len(swapped)


def quantized_copy(module: nn.Module, kind: WeightQuantization) -> nn.Module:
    """A copy of `module` whose Linear layers are quantized (the original is untouched): a cheaper twin of the
    target's blocks for self-speculative drafting. Parameters are shared, not copied, until quantize_linears
    replaces the Linears (norm weights stay shared); oneDNN-packed copies of the weights are left out."""
    memo: dict[int, object] = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    memo.update({id(m.packed): None for m in module.modules() if getattr(m, "packed", None) is not None})
    twin = copy.deepcopy(module, memo)
    quantize_linears(twin, kind)
    return twin
