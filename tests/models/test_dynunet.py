"""``dynunet``: nnU-Net's planning rule, the preset plans, MONAI's forward in eval, nnU-Net's deep supervision in
training, and a training step."""

from __future__ import annotations

import pytest
import torch

from sparseseg.models.common.registry import create_model
from sparseseg.models.dynunet import plan_unet
from sparseseg.training.losses import SegmentationLoss


def test_isotropic_plans_halve_every_axis_down_to_a_feature_map_under_8():
    plan = plan_unet(128)  # 128 -> 64 -> 32 -> 16 -> 8 -> 4
    assert plan.num_stages == 6 and plan.bottleneck_size == (4, 4, 4)
    assert plan.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5 and plan.kernel_size == ((3, 3, 3),) * 6
    assert plan.filters == (32, 64, 128, 256, 320, 320)
    plan = plan_unet(96, (1.5, 1.5, 2.0))  # 96 -> 48 -> 24 -> 12 -> 6; 2.0 / 1.5 < 2: isotropic for the rule
    assert plan.num_stages == 5 and plan.bottleneck_size == (6, 6, 6) and plan.filters == (32, 64, 128, 256, 320)


def test_a_coarse_axis_gets_kernel_1_and_no_stride_until_it_catches_up():
    plan = plan_unet((32, 128, 128), (3.0, 0.8, 0.8))
    assert plan.kernel_size[0] == (1, 3, 3) and plan.strides[1] == (1, 2, 2)
    assert plan.kernel_size[1] == (3, 3, 3) and plan.strides[2] == (2, 2, 2)  # 3.0 / 1.6 < 2
    assert plan.divisor() == (8, 32, 32) and plan.bottleneck_size == (4, 4, 4)  # 3 and 5 downsamplings


@pytest.mark.parametrize("size, message", [(12, "too small"), (36, "divisible by"), (0, "positive")])
def test_bad_patches_raise(size, message):
    with pytest.raises(ValueError, match=message):
        plan_unet(size)


@pytest.mark.parametrize("preset, stages, heads", [("btcv", 5, 2), ("brats", 6, 3)])
def test_presets_carry_the_plan_of_their_roi_and_spacing(preset, stages, heads):
    with torch.device("meta"):
        model = create_model("dynunet", preset)
    assert model.plan.num_stages == stages and len(model.ds_heads) == heads
    assert model.inference_parameters() < sum(p.numel() for p in model.parameters())


def _tiny(**kwargs):
    torch.manual_seed(0)
    return create_model("dynunet", in_channels=2, out_channels=3, img_size=16, min_feature_map_size=2, base_features=4,
                        max_features=16, **kwargs)


def test_eval_returns_logits_and_training_adds_the_weighted_lower_levels():
    model = _tiny()  # 4 stages (minimum map 2): 16 -> 8 -> 4 -> 2; one head (1/2), the 1/4 level weighs 0
    x = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(x)
        out = model.train()(x)
    assert logits.shape == (2, 3, 16, 16, 16)
    assert [tuple(o.shape) for o in out.deep_supervision] == [(2, 3, 8, 8, 8)]
    assert out.deep_supervision_weights == [1.0, 0.5]
    torch.testing.assert_close(out.logits, logits)  # the training path runs MONAI's blocks as its forward does


def test_without_deep_supervision_no_heads():
    model = _tiny(deep_supervision=False).train()
    assert len(model.ds_heads) == 0
    assert model(torch.zeros(1, 2, 16, 16, 16)).deep_supervision == []


def test_a_training_step_reaches_the_network_and_the_heads():
    model = _tiny().train()
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(3))
    loss, _ = SegmentationLoss()(model(x, target=y), y)
    loss.backward()
    assert model.ds_heads[0].conv.conv.weight.grad.abs().sum() > 0
    assert model.net.input_block.conv1.conv.weight.grad.abs().sum() > 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"expected input \[B, 2"):
        _tiny().eval()(torch.zeros(1, 1, 16, 16, 16))


def test_counting_macs_on_meta_leaves_the_weights_alone():
    from sparseseg.benchmark.flops import count_macs

    model = _tiny().eval()
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(x)
    assert count_macs(model, x.shape) == count_macs(model, x.shape, device="cpu") > 0
    assert {p.device.type for _, p in model.named_parameters(remove_duplicate=False)} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
