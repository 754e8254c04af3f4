from __future__ import annotations

import pytest
import torch

from sparseseg import create_model
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.tokenseg.boundary import (
    TokenSelection,
    boundary_band,
    boundary_report,
    cell_band_fraction,
    cell_touches_band,
    chance_boundary_fraction,
    selected_boundary_fraction,
)
from sparseseg.models.tokenseg.model import TokenSeg
from sparseseg.models.tokenseg.vq import VectorQuantizer, nearest_code

TINY = dict(in_channels=2, out_channels=3, img_size=32, feature_size=4, token_size=24, num_heads=2,
            tokens_per_level=(40, 30, 20, 8), num_candidates=98, num_keep=24, codebook_size=64, mixer_depth=1)


def tiny(**overrides) -> TokenSeg:
    torch.manual_seed(0)
    return create_model("tokenseg", **{**TINY, **overrides})


def ball_label(size: int = 32, batch: int = 2) -> torch.Tensor:
    """Class indices ``[B, 1, S, S, S]``: a ball (1) holding a cube (2), shifted per case."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))  # [3, S, S, S]
    labels = []
    for b in range(batch):
        centre = torch.tensor([size / 2 + 2 * b, size / 2, size / 2 - b])[:, None, None, None]
        r = (grid - centre).norm(dim=0)
        cube = ((grid - centre).abs() < size / 8).all(0)
        labels.append(torch.where(cube, 2, (r < size / 4).long()))
    return torch.stack(labels)[:, None]  # [B, 1, S, S, S]


def test_token_counts_per_level_and_total():
    model = tiny()
    assert model.tokens_per_level == (40, 30, 20, 8) and model.num_candidates == 98
    x = torch.randn(2, 2, 32, 32, 32)
    enc = model.eval().forward_encoder(x)
    assert enc.cand_cells.shape == (2, 98) and enc.score_logits.shape == (2, 98)
    for level, (n, grid) in enumerate(zip(model.tokens_per_level, model.grid_sizes, strict=True)):
        cells = enc.cand_cells[:, model.cand_levels == level]  # [B, n]
        assert cells.shape == (2, n)
        assert int(cells.max()) < grid[0] * grid[1] * grid[2]
        assert all(len(set(row.tolist())) == n for row in cells)  # distinct cells within a level
    assert [f.shape[2:] for f in enc.features] == [(16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]


def test_default_split_is_400_candidates_and_100_kept():
    model = create_model("tokenseg", img_size=32, feature_size=4, token_size=24, num_heads=2, codebook_size=64)
    assert sum(model.tokens_per_level) == 400
    assert create_model("tokenseg", preset="btcv").tokens_per_level == (160, 120, 80, 40)
    brats = create_model("tokenseg", preset="brats")
    assert brats.tokens_per_level == (160, 120, 80, 40) and brats.img_size == (128,) * 3
    sel = model.select_tokens(torch.randn(1, 1, 32, 32, 32))
    assert sel.levels.shape == (1, 100) and sel.cells.shape == (1, 100, 3)
    # 1/16 holds 8 cells, 1/8 64: their excess moves to the next finer level; kept tokens follow the proportions
    assert model.tokens_per_level == (160, 168, 64, 8) and model._keep_split() == [40, 42, 16, 2]
    assert torch.bincount(sel.levels[0], minlength=4).tolist() == [40, 42, 16, 2]


@pytest.mark.parametrize("training", [True, False])
def test_keep_per_level_quota(training):
    model = tiny(keep_per_level=(10, 0, 10, 4)).train(training)
    enc = model.forward_encoder(torch.randn(2, 2, 32, 32, 32))
    assert torch.bincount(model.cand_levels[enc.keep_idx].flatten(), minlength=4).tolist() == [20, 0, 20, 8]
    assert torch.all(enc.keep_idx.diff(dim=1) > 0)
    model.keep_per_level = None
    model.num_keep = 49  # runtime knob: the split follows the candidates (40, 30, 20, 8)
    assert model._keep_split() == [20, 15, 10, 4]


@pytest.mark.parametrize("training", [True, False])
def test_selection_size_and_train_eval_contract(training):
    model = tiny().train(training)
    x, target = torch.randn(2, 2, 32, 32, 32), ball_label()
    out = model(x, target)
    logits = out.logits if training else out
    assert isinstance(out, SegmentationOutput) == training
    assert logits.shape == (2, 3, 32, 32, 32)
    enc = model.forward_encoder(x)
    assert enc.keep_idx.shape == (2, 24) and enc.kept.shape == (2, 24, 24) and enc.drop_idx.shape == (2, 74)
    together = torch.cat([enc.keep_idx, enc.drop_idx], 1).sort(1).values
    assert torch.equal(together, torch.arange(98).expand(2, -1))
    if training:
        assert set(out.aux_losses) == {"vq_codebook", "vq_commitment", "boundary", "proposal"}
        assert all(v.ndim == 0 for v in out.aux_losses.values())
        assert set(model(x).aux_losses) == {"vq_codebook", "vq_commitment"}  # no target: no boundary losses


def test_forward_backward_finite_and_gradients_reach_every_part():
    model = tiny().train()
    out = model(torch.randn(2, 2, 32, 32, 32), ball_label())
    loss = out.logits.square().mean() + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in ("stages.3", "proposal.0", "vq.codebook", "scorer", "mixer", "decoder.reproject.2", "decoder.fill.0",
                 "decoder.refine.0", "decoder.coarse_head", "decoder.head", "decoder.image_skip"):
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(part)]
        assert sum(grads) > 0, part


def test_mixed_precision_training_step():
    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU stand-in for CUDA float16 autocast
        out = model(torch.randn(1, 2, 32, 32, 32), ball_label(batch=1))
    loss = out.logits.float().mean() + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss) and out.logits.shape == (1, 3, 32, 32, 32)
    assert model.vq.codebook.grad is not None and model.vq.codebook.dtype == torch.float32


def test_vq_straight_through_gradient_reaches_encoder():
    z = torch.randn(2, 5, 8, requires_grad=True)
    vq = VectorQuantizer(num_codes=16, dim=8).eval()
    q = vq(z)
    assert torch.allclose(q.tokens, vq.codebook[q.codes])  # the forward value is the nearest code
    q.tokens.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity in the backward pass
    # in the model, kept tokens depend on the encoder only through the quantiser
    model = tiny().eval()
    model.forward_encoder(torch.randn(1, 2, 32, 32, 32)).kept.square().sum().backward()
    for n in ("stages.0", "stages.3", "token_embed.1"):
        assert sum(p.grad.abs().sum() for k, p in model.named_parameters() if k.startswith(n)) > 0, n
    assert model.scorer.out[-1].weight.grad is None  # eval: a plain top-K, no gradient to the scorer


def test_nearest_code_is_l2_argmin():
    torch.manual_seed(0)
    z, codebook = torch.randn(3, 7, 5), torch.randn(11, 5)
    expected = torch.cdist(z, codebook.expand(3, -1, -1)).argmin(-1)
    assert torch.equal(nearest_code(z, codebook), expected)


def test_codebook_loss_decreases_on_a_tiny_overfit():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=32, dim=4, reinit_every=10**6).train()
    vq.steps.fill_(1)  # skip the data-dependent initialisation: learn from the random codebook
    z = torch.randn(1, 64, 4) * 0.5 + 1.0
    opt = torch.optim.Adam(vq.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        q = vq(z)
        opt.zero_grad()
        (q.codebook_loss + 0.25 * q.commitment_loss).backward()
        opt.step()
        losses.append(float(q.codebook_loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    assert 0.0 < vq.codebook_usage() <= 1.0 and 1.0 <= float(vq.last_perplexity) <= 32


def test_codebook_data_initialisation_and_dead_code_reinit():
    torch.manual_seed(0)
    z = torch.randn(1, 64, 4) * 0.5 + 3.0
    vq = VectorQuantizer(num_codes=32, dim=4, reinit_every=10).train()
    random_init = float(vq.eval()(z).codebook_loss.detach())
    first = float(vq.train()(z).codebook_loss.detach())  # first training step: codes drawn from the batch
    assert first < 0.1 * random_init and int(vq.steps) == 1
    # move the codebook far away: every code is dead and is reset onto the data at the next check
    vq.codebook.data += 100.0
    vq.usage.zero_()
    vq.steps.fill_(vq.reinit_every)
    assert float(vq(z).codebook_loss.detach()) < 1.0
    assert (vq.codebook - z[0].mean(0)).norm(dim=1).max() < 10.0
    assert vq.codebook_usage() > 0.0


def test_boundary_band_and_cell_targets_on_a_cube():
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., 2:6, 2:6, 2:6] = 1
    band = boundary_band(label, radius=1)
    expected = torch.zeros_like(label, dtype=torch.bool)
    expected[..., 1:7, 1:7, 1:7] = True
    expected[..., 3:5, 3:5, 3:5] = False  # dilation minus erosion of the cube
    assert torch.equal(band, expected) and int(band.sum()) == 6**3 - 2**3
    # each 4^3 cell holds the band's 3^3 corner minus the erosion's 1 voxel
    assert torch.allclose(cell_band_fraction(band, 4), torch.full((1, 8), 26 / 64))
    frac2 = cell_band_fraction(band, 2).reshape(4, 4, 4)
    assert frac2[0, 0, 0] == 1 / 8 and frac2[1, 1, 1] == 7 / 8 and frac2[0, 1, 1] == 4 / 8
    assert torch.equal(cell_touches_band(band, 2), cell_band_fraction(band, 2) > 0)
    # class indices and multi-hot regions give the union of the per-class bands
    two = label.clone()
    two[..., 3:5, 3:5, 3:5] = 2
    regions = torch.cat([two > 0, two == 2], 1)
    assert torch.equal(boundary_band(two, 1), boundary_band(regions, 1))
    assert int(boundary_band(two, 1).sum()) == 6**3  # the inner cube's band fills the hole
    # the separable max pools equal the cubic dilation / erosion at a wider radius too
    torch.manual_seed(0)
    rand = torch.randint(0, 3, (2, 1, 12, 12, 12)).float()
    pool = torch.nn.functional.max_pool3d
    direct = pool(rand, 5, 1, 2) != -pool(-rand, 5, 1, 2)
    assert torch.equal(boundary_band(rand, 2), direct)
    with pytest.raises(ValueError, match="radius"):
        boundary_band(label, radius=0)


def test_selection_maps_and_boundary_fraction():
    sel = TokenSelection(
        levels=torch.tensor([[0, 0, 1]]), cells=torch.tensor([[[0, 0, 0], [3, 3, 3], [1, 0, 0]]]),
        scores=torch.zeros(1, 3), strides=(2, 4), grid_sizes=((4, 4, 4), (2, 2, 2)),
    )
    maps = sel.level_maps()
    assert [int(m.sum()) for m in maps] == [2, 1] and maps[0][0, 3, 3, 3] and maps[1][0, 1, 0, 0]
    voxels = sel.voxel_map()
    assert voxels.shape == (1, 8, 8, 8) and voxels[0, 0, 0, 0] == 1 and voxels[0, 4, 0, 0] == 2
    assert voxels[0, 0, 7, 7] == 0
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., :, :, 4:] = 1  # a plane boundary between x = 3 and x = 4
    touch = sel.touches_band(boundary_band(label, 1))
    assert touch.tolist() == [[False, False, True]]  # (0,0,0)@2 covers x 0-1, (3,3,3)@2 covers x 6-7
    assert torch.allclose(selected_boundary_fraction(sel, label, 1), torch.tensor([1 / 3]))


def _plane_selection(levels: list[int], cells: list[list[int]]) -> tuple[TokenSelection, torch.Tensor]:
    """A selection on an 8^3 volume (levels of stride 2 and 4) and a label whose boundary is the plane between
    x = 3 and x = 4: at radius 1 the band is x in {3, 4}."""
    sel = TokenSelection(levels=torch.tensor([levels]), cells=torch.tensor([cells]), scores=torch.zeros(1, len(levels)),
                         strides=(2, 4), grid_sizes=((4, 4, 4), (2, 2, 2)))
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., 4:] = 1
    return sel, label


def test_boundary_fraction_share_and_chance_on_a_plane():
    # level 0: x-cells [0, 1] [2, 3] [4, 5] [6, 7]: the middle two touch the band, each half inside it;
    # level 1: x-cells [0..3] [4..7] both touch it, a quarter inside
    sel, label = _plane_selection([0, 0, 0, 1], [[0, 0, 1], [1, 2, 2], [3, 3, 3], [0, 0, 1]])
    report = boundary_report(sel, label, radius=1)
    assert torch.allclose(report["touches"], torch.tensor([3 / 4]))
    assert torch.allclose(report["share"], torch.tensor([(0.5 + 0.5 + 0 + 0.25) / 4]))
    # chance: 3 random level-0 cells touch with probability 1/2, 1 level-1 cell with 1; share: the band's volume 1/4
    assert torch.allclose(report["touches_chance"], torch.tensor([(3 * 0.5 + 1.0) / 4]))
    assert torch.allclose(report["share_chance"], torch.tensor([0.25]))
    assert torch.equal(chance_boundary_fraction(sel, label, 1, "share"), report["share_chance"])
    assert torch.equal(selected_boundary_fraction(sel, label, 1, "share"), report["share"])
    with pytest.raises(ValueError, match="measure"):
        selected_boundary_fraction(sel, label, 1, "near")


def test_chance_level_equals_random_selections_per_level_quota():
    label = ball_label(size=32, batch=1)
    model = tiny().eval()
    sel = model.select_tokens(torch.randn(1, 2, 32, 32, 32))
    quota = torch.bincount(sel.levels[0], minlength=4)
    gen = torch.Generator().manual_seed(0)
    draws = {"touches": [], "share": []}
    for _ in range(400):  # random cells, the same number per level as the model kept
        levels, cells = [], []
        for level, (k, grid) in enumerate(zip(quota.tolist(), model.grid_sizes, strict=True)):
            flat = torch.randperm(grid[0] * grid[1] * grid[2], generator=gen)[:k]
            levels += [level] * k
            cells += torch.stack([flat // (grid[1] * grid[2]), flat // grid[2] % grid[1], flat % grid[2]], 1).tolist()
        rand = TokenSelection(torch.tensor([levels]), torch.tensor([cells]), torch.zeros(1, len(levels)),
                              sel.strides, sel.grid_sizes)
        for measure in draws:
            draws[measure].append(float(selected_boundary_fraction(rand, label, 2, measure)))
    for measure, values in draws.items():
        assert abs(sum(values) / len(values) - float(chance_boundary_fraction(sel, label, 2, measure))) < 0.01


def test_deterministic_eval_and_select_tokens():
    model = tiny().eval()
    x = torch.randn(1, 2, 32, 32, 32)
    assert torch.equal(model(x), model(x))
    a, b = model.select_tokens(x), model.select_tokens(x)
    assert torch.equal(a.levels, b.levels) and torch.equal(a.cells, b.cells)
    assert not model.training
    model.train()
    model.select_tokens(x)
    assert model.training  # select_tokens restores the mode
    counts = torch.bincount(a.levels.flatten(), minlength=4)
    assert int(counts.sum()) == 24 and (a.cells >= 0).all()
    frac = selected_boundary_fraction(a, ball_label(batch=1))
    assert frac.shape == (1,) and 0.0 <= float(frac) <= 1.0


def test_state_dict_keys_do_not_depend_on_num_keep():
    a, b = tiny(num_keep=10), tiny(num_keep=40)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    b.num_keep = 5  # a runtime knob
    assert b.eval()(torch.randn(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(tokens_per_level=(40, 30, 28)), "4 entries"),
        (dict(tokens_per_level=(40, 30, 20, 9)), "sums to 99"),
        (dict(num_keep=99), "num_keep"),
        (dict(num_keep=0), "num_keep"),
        (dict(keep_per_level=(10, 10, 10)), "keep_per_level"),
        (dict(keep_per_level=(10, 4, 0, 10)), r"keep_per_level\[3\]=10"),
        (dict(img_size=40), "divisible by 16"),
        (dict(img_size=(32, 32)), "divisible by 16"),
        (dict(tokens_per_level=(20, 30, 20, 28)), r"tokens_per_level\[3\]=28"),
        (dict(tokens_per_level=(98, 0, 0, 0)), r"tokens_per_level\[1\]=0"),
        (dict(num_candidates=5000, tokens_per_level=None), "exceeds"),
        (dict(token_size=26, num_heads=2), "divisible by 2 \\* num_heads"),
        (dict(num_heads=0), "num_heads"),
        (dict(band_radius=0), "band_radius"),
        (dict(tau=0.0), "tau"),
        (dict(norm_name="layer"), "norm_name"),
        (dict(feature_size=0), "feature_size"),
        (dict(skips="all"), "skips"),
    ],
)
def test_bad_arguments_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_input_shape_and_runtime_num_keep_raise():
    model = tiny().eval()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 2, 16, 16, 16))
    model.num_keep = 200
    with pytest.raises(ValueError, match="num_keep"):
        model(torch.randn(1, 2, 32, 32, 32))
