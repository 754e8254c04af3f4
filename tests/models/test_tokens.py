from __future__ import annotations

import pytest
import torch

from sparseseg.models.common.tokens import gather_tokens, num_keep, scatter_tokens, soft_topk, split_topk


def test_gather_scatter_round_trip():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 4)
    keep, drop = split_topk(torch.randn(3, 10), 6)
    rebuilt = scatter_tokens(torch.zeros_like(x), keep, gather_tokens(x, keep))
    rebuilt = scatter_tokens(rebuilt, drop, gather_tokens(x, drop))
    assert torch.equal(rebuilt, x)
    # kept and dropped indices partition the tokens and stay in spatial order
    assert torch.equal(torch.cat([keep, drop], 1).sort(1).values, torch.arange(10).expand(3, -1))
    assert torch.all(keep.diff(dim=1) > 0) and torch.all(drop.diff(dim=1) > 0)


@pytest.mark.parametrize("ratio,n,k", [(0.0, 10, 10), (0.75, 4096, 1024), (0.9, 1728, 172), (0.9, 17, 1), (0.99, 5, 1)])
def test_num_keep(ratio, n, k):
    assert num_keep(n, ratio) == k


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_num_keep_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="prune_ratio"):
        num_keep(10, ratio)


def test_soft_topk_forward_is_hard_and_backward_reaches_scores():
    torch.manual_seed(0)
    log_scores = torch.randn(2, 8, requires_grad=True)
    sel = soft_topk(log_scores, 3, tau=1.0, noise=True)
    assert torch.equal(sel.keep_mask, torch.ones(2, 3)) and torch.equal(sel.drop_mask, torch.ones(2, 5))
    x = torch.randn(2, 8, 4)
    loss = (gather_tokens(x, sel.keep_idx) * sel.keep_mask[..., None]).square().sum()
    loss = loss + (gather_tokens(x, sel.drop_idx) * sel.drop_mask[..., None]).sum()
    loss.backward()
    assert log_scores.grad is not None and log_scores.grad.abs().sum() > 0


def test_soft_topk_without_noise_is_plain_topk():
    log_scores = torch.tensor([[0.1, 0.9, 0.3, 0.7]])
    sel = soft_topk(log_scores, 2, noise=False, differentiable=False)
    assert sel.keep_idx.tolist() == [[1, 3]] and sel.drop_idx.tolist() == [[0, 2]]


def test_soft_topk_noise_and_selection_are_float32_masks_keep_the_input_dtype():
    torch.manual_seed(0)
    log_scores = torch.randn(2, 64).bfloat16().requires_grad_(True)
    low = soft_topk(log_scores, 10, generator=torch.Generator().manual_seed(3))
    full = soft_topk(log_scores.detach().float(), 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(low.keep_idx, full.keep_idx) and torch.equal(low.drop_idx, full.drop_idx)
    assert low.keep_mask.dtype == low.drop_mask.dtype == torch.bfloat16
    assert torch.equal(low.keep_mask, torch.ones_like(low.keep_mask))
    low.keep_mask.sum().backward()
    assert log_scores.grad is not None and log_scores.grad.abs().sum() > 0
