"""Block gathers and scatters (models/common/blocks.py): against explicit slicing of a zero-padded map, on sizes
that are not multiples of the block, with a halo, batch > 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparseseg.models.common.blocks import block_coords, block_grid, gather_blocks, inside_mask, scatter_blocks


def _reference_gather(x: torch.Tensor, idx: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """The same blocks cut out one by one from an explicitly zero-padded map."""
    grid = block_grid(x.shape[2:], block)
    padded = F.pad(x, [halo, halo + block * grid[2], halo, halo + block * grid[1], halo, halo + block * grid[0]])
    s = block + 2 * halo
    out = []
    for b in range(idx.shape[0]):
        for n in idx[b].tolist():
            i, j, k = (int(c) for c in block_coords(torch.tensor(n), grid))
            out.append(padded[b, :, i * block:i * block + s, j * block:j * block + s, k * block:k * block + s])
    return torch.stack(out)


@pytest.mark.parametrize("size,block,halo", [((8, 8, 8), 4, 0), ((7, 10, 5), 4, 2), ((9, 6, 11), 3, 4),
                                             ((5, 5, 5), 8, 1)])
def test_gather_matches_slicing_of_the_padded_map(size, block, halo):
    torch.manual_seed(0)
    x = torch.randn(3, 2, *size)
    nb = math.prod(block_grid(size, block))
    idx = torch.stack([torch.randperm(nb)[: max(1, nb // 2)].sort().values for _ in range(3)])  # [B, K]
    got = gather_blocks(x, idx, block, halo)
    assert got.shape == (3 * idx.shape[1], 2, block + 2 * halo, block + 2 * halo, block + 2 * halo)
    assert torch.equal(got, _reference_gather(x, idx, block, halo))
    cl = x.contiguous(memory_format=torch.channels_last_3d)  # the decoders' layout gives the same blocks
    assert torch.equal(gather_blocks(cl, idx, block, halo), got)


@pytest.mark.parametrize("size,block", [((8, 8, 8), 4), ((7, 10, 5), 4), ((3, 3, 3), 2)])
def test_scatter_inverts_gather_and_touches_only_its_blocks(size, block):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    nb = math.prod(block_grid(size, block))
    idx = torch.tensor([[0, nb - 1], [1, nb // 2]])  # the far corner block sticks out of odd sizes
    assert torch.equal(scatter_blocks(x, idx, gather_blocks(x, idx, block), block), x)
    ones = scatter_blocks(torch.zeros_like(x), idx, torch.ones(4, 3, block, block, block), block)
    expected = torch.zeros_like(x)
    grid = block_grid(size, block)
    for b in range(2):
        for n in idx[b].tolist():
            i, j, k = (int(c) for c in block_coords(torch.tensor(n), grid))
            expected[b, :, i * block:(i + 1) * block, j * block:(j + 1) * block, k * block:(k + 1) * block] = 1
    assert torch.equal(ones, expected)


def test_scatter_is_differentiable_in_both_inputs():
    dst = torch.randn(1, 2, 6, 6, 6, requires_grad=True)
    values = torch.randn(2, 2, 3, 3, 3, requires_grad=True)
    idx = torch.tensor([[0, 7]])
    scatter_blocks(dst, idx, values, 3).sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))
    assert dst.grad.sum() == 6**3 * 2 - 2 * 27 * 2  # zero where a block overwrote it


def test_inside_mask_marks_the_map():
    size, block, halo = (5, 6, 7), 4, 2
    grid = block_grid(size, block)
    idx = torch.arange(math.prod(grid)).view(1, -1)
    mask = inside_mask(idx, grid, size, block, halo)
    ones = gather_blocks(torch.ones(1, 1, *size), idx, block, halo)  # 1 inside the map, 0 in the padding
    assert torch.equal(mask, ones)
