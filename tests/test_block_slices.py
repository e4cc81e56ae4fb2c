"""block_layout.slice_columns (a row-parallel shard of a quantized weight) against dequantize_packed of the whole
weight: every type the layout holds and a fused mixed-type projection, odd row counts, cuts on every kind of group
boundary; cuts inside a group are refused; the two halves' products sum to the whole's."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_quant_blocks import TYPES, needs_kernel, random_blocks

from treespec.kernels.block_layout import PackedBlocks, concat_rows, dequantize_packed, pack, slice_columns
from treespec.kernels.block_mm import block_mm

WIDTH = 768  # three 256-weight super-blocks: cuts inside a K-quant super-block are on group boundaries too


def packed(qtype: Q, rows: int = 7, seed: int = 0) -> PackedBlocks:
    return pack(random_blocks(qtype, rows, WIDTH, seed), qtype, (rows, WIDTH))


def fused() -> PackedBlocks:
    """q/k/v-like: Q6_K (16-groups) over Q4_K (mins) over Q5_0 -> one 16-group weight with mins."""
    return concat_rows([packed(Q.Q6_K, 5, 1), packed(Q.Q4_K, 3, 2), packed(Q.Q5_0, 1, 3)])


CASES = {q.name: (lambda q=q: packed(q)) for q in TYPES} | {"fused": fused}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_slices_hold_the_same_weights(make) -> None:
    p = make()
    whole = dequantize_packed(p)
    g = p.group
    for start, stop in [(0, WIDTH), (0, g), (g, WIDTH), (5 * g, 11 * g), (g, 4 * g), (0, WIDTH // 2),
                        (WIDTH // 2, WIDTH), (WIDTH - g, WIDTH)]:
        part = slice_columns(p, start, stop)
        assert part.shape == (p.shape[0], stop - start) and part.group == g
        assert (part.min is None) == (p.min is None)
        assert torch.equal(dequantize_packed(part), whole[:, start:stop])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_cuts_off_group_boundaries_are_refused(qtype: Q) -> None:
    p = packed(qtype)
    g = p.group
    for start, stop in [(1, WIDTH), (0, g + 1), (g // 2, g), (0, WIDTH + g), (2 * g, 2 * g), (3 * g, g),
                        (-g, g)]:
        with pytest.raises(ValueError, match=f"{g}-weight group boundaries"):
            slice_columns(p, start, stop)


@needs_kernel
@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_row_parallel_halves_sum_to_the_whole(make) -> None:
    """What an all-reduce of two o/down shards computes: the whole product, to fp32 rounding."""
    p = make()
    x = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))
    half = WIDTH // 2
    parts = block_mm(x[:, :half].contiguous(), slice_columns(p, 0, half)) + \
        block_mm(x[:, half:].contiguous(), slice_columns(p, half, WIDTH))
    torch.testing.assert_close(parts, block_mm(x, p), rtol=1e-5, atol=1e-5)
