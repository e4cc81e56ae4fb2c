"""x @ W^T for the rows of decoding, tree verification and prefill, in the fastest exact fp32 form on this CPU.

Measured over Gemma-3-270M-shaped layers (18 x fused qkv, o, gate_up, down; 2 threads, ms per pass):

    T (rows)                      1     2     3     4     8    16    32    64   256
    F.linear                     29    52    60    42    39    47    64    97   294
    mm(W, x^T)                   14    13    18    19    32    37    52    82   275
    oneDNN, pre-packed weight    17    19    15    14    17    22    36    62   234

So one or two rows take the transposed BLAS product (one row computed as two: the matrix-vector kernel streams
W about 2x slower than a two-column product) and three or more take oneDNN's inner product over a weight
reordered once into its blocked layout, which keeps a 4-16-node token tree close to the cost of one token.
"""
import torch

PACKED_MIN_ROWS = 3         # from here on the pre-packed oneDNN product wins
PACK_MIN_NUMEL = 1 << 18    # smaller weights stay unpacked: oneDNN's ~20 us call overhead outweighs its gain
_PACK_HINT = 16       # the row count oneDNN tunes its layout for (4-64 measured alike)


def few_rows_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # weight: [out, in], x: [T, in]
    """[T, out] as (W @ x^T)^T: BLAS runs this 1.5-4x faster than F.linear for 1-64 rows."""
    if x.shape[0] == 1:
        return torch.mm(weight, torch.cat([x, x]).t())[:, :1].t()
    return torch.mm(weight, x.t()).t()


def packing_available() -> bool:
    """oneDNN (mkldnn) is in x86 and ARM builds of PyTorch; other builds keep the BLAS path."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:  # weight: [out, in] fp32 -> opaque oneDNN tensor
    """A copy of `weight` in oneDNN's blocked layout (same values, +out*in*4 bytes); None when unavailable."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or not packing_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:  # x: [T, in] -> [T, out]
    """x @ W^T (+ bias) through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
