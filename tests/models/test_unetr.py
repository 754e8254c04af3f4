from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR as MonaiUNETR

from sparseseg import count_params, create_model, list_models
from sparseseg.models.common.norms import ChannelInstanceNorm3d
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import resolve_model_args

TINY_VIT = dict(hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3, feature_size=4)
TINY_SPARSE = dict(prune_after=(1, 2, 3), completion_size=48, completion_heads=3)


def test_registered_names():
    assert {"unetr", "stp_mta_unetr"} <= set(list_models())


def test_parameter_parity_with_monai_unetr():
    """Patch 16, 96^3, ViT-B: the same parameters as MONAI's UNETR, the [CLS] token and its position aside."""
    with torch.device("meta"):  # shapes only: building two ViT-B models takes no time or memory
        ours = create_model("unetr", img_size=96, in_channels=1, out_channels=14, patch_size=16, feature_size=16)
        monai = MonaiUNETR(in_channels=1, out_channels=14, img_size=96, feature_size=16, qkv_bias=True)
    assert ours.decoder_name == "original" and ours.skip_layers == (4, 7, 10)
    # MONAI 1.6 builds a cross-attention LayerNorm in every block even without cross-attention; it is never used
    unused = sum(p.numel() for n, p in monai.named_parameters() if ".norm_cross_attn." in n)
    assert unused == 12 * 2 * 768
    # beyond MONAI: [CLS] and its position row, and sparse decoding's coarse heads (1x1x1 32 -> 14, 3^3 1 -> 14)
    assert count_params(ours.sparse_decoding) == (32 * 14 + 14) + (27 * 14 + 14)
    assert count_params(ours) - count_params(ours.sparse_decoding) - (count_params(monai) - unused) == 2 * 768
    assert count_params(ours.decoder) == count_params(monai) - count_params(monai.vit)


@pytest.mark.parametrize("decoder,patch,taps", [("original", 16, (4, 7, 10)), ("v2", 8, (4, 7, 10)), ("v1", 8, (5, 9))])
def test_default_taps_are_the_authors_for_vit_b(decoder, patch, taps):
    with torch.device("meta"):
        assert create_model("unetr", patch_size=patch, decoder=decoder).skip_layers == taps  # 12 blocks


@pytest.mark.parametrize("decoder,indices", [("v2", (3, 6, 9)), ("v1", (4, 8))])
def test_taps_are_the_authors_hidden_states_out(decoder, indices):
    """The authors' decoders read ``hidden_states_out[3/6/9]`` (v2) and ``[4/8]`` (v1) of a list appended after
    every block (as MONAI's UNETR): the default taps are exactly those block outputs."""
    torch.manual_seed(0)
    model = create_model("unetr", in_channels=1, out_channels=2, img_size=32, decoder=decoder, hidden_size=12,
                         mlp_dim=24, num_layers=12, num_heads=2, feature_size=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        z, hidden_states_out = model.vit.embed(x), []
        for blk in model.vit.blocks:
            z, _ = blk(z)
            hidden_states_out.append(z)
        final, taps = model.forward_encoder(x)
    assert len(taps) == len(indices)
    for tap, i in zip(taps, indices, strict=True):
        assert torch.equal(tap, hidden_states_out[i])
    assert torch.equal(final, model.vit.norm(hidden_states_out[-1]))


@pytest.mark.parametrize("num_layers,decoder,taps", [
    (1, "v1", (1, 1)), (2, "v2", (1, 2, 2)), (3, "v2", (1, 2, 3)), (6, "v2", (2, 4, 5)), (6, "v1", (3, 5)),
    (24, "original", (7, 13, 19)),
])
def test_default_taps_follow_the_depth(num_layers, decoder, taps):
    patch = 16 if decoder == "original" else 8
    with torch.device("meta"):
        model = create_model("unetr", img_size=32, patch_size=patch, decoder=decoder, hidden_size=12, mlp_dim=24,
                             num_layers=num_layers, num_heads=2)
    assert model.skip_layers == taps


def test_shallow_unetr_builds_and_runs():
    torch.manual_seed(0)
    model = create_model("unetr", in_channels=1, out_channels=2, img_size=32, **{**TINY_VIT, "num_layers": 3}).eval()
    assert model.skip_layers == (1, 2, 3)
    with torch.inference_mode():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr"])
def test_presets(name):
    btcv, brats = resolve_model_args(name, "btcv"), resolve_model_args(name, "brats")
    assert (btcv["img_size"], btcv["in_channels"], btcv["out_channels"]) == (96, 1, 14)
    assert (brats["img_size"], brats["in_channels"], brats["out_channels"]) == (128, 4, 3)
    assert btcv["patch_size"] == brats["patch_size"] == 8
    assert (btcv["decoder"], brats["decoder"]) == ("v2", "v1")
    if name == "stp_mta_unetr":
        assert (btcv["prune_ratio"], brats["prune_ratio"]) == (0.9, 0.75)
    with torch.device("meta"):
        model = create_model(name, preset="brats", decoder="v2", num_layers=10)  # overrides win
    assert model.decoder_name == "v2" and model.num_layers == 10 and model.grid_size == (16, 16, 16)
    assert model.vit.hidden_size == 768 and len(model.vit.blocks[0].attn.qkv.bias) == 3 * 768


@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr"])
@pytest.mark.parametrize("decoder,patch,img", [("original", 16, 32), ("v1", 8, (16, 24, 16)), ("v2", 8, 32)])
def test_forward_contract(name, decoder, patch, img):
    torch.manual_seed(0)
    extra = TINY_SPARSE if name == "stp_mta_unetr" else {"skip_layers": (1, 2, 3)[: 2 if decoder == "v1" else 3]}
    model = create_model(name, in_channels=2, out_channels=3, img_size=img, patch_size=patch, decoder=decoder,
                         **TINY_VIT, **extra)
    size = (img,) * 3 if isinstance(img, int) else img
    with torch.inference_mode():
        logits = model.eval()(torch.randn(1, 2, *size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, *size)
    out = model.train()(torch.randn(2, 2, *size), target=torch.zeros(2, 1, *size, dtype=torch.long))
    assert isinstance(out, SegmentationOutput) and out.logits.shape == (2, 3, *size)
    assert torch.isfinite(out.logits).all()


def test_dense_policy_keeps_everything_and_encoder_outputs():
    torch.manual_seed(0)
    model = create_model("unetr", in_channels=1, out_channels=2, img_size=16, decoder="v1", skip_layers=(2, 4),
                         **TINY_VIT).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.equal(model.pruning_policy(x), torch.full((2, 8), 4))
    final, taps = model.forward_encoder(x)
    assert final.shape == (2, 9, 48) and [t.shape for t in taps] == [(2, 9, 48)] * 2


def test_sparse_encoder_output_and_runtime_ratio():
    torch.manual_seed(0)
    model = create_model("stp_mta_unetr", in_channels=1, out_channels=2, img_size=32, prune_ratio=0.5,
                         **TINY_VIT, **TINY_SPARSE).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    assert model.forward_encoder(x).final.shape == (1, 1 + 8, 48)
    model.prune_ratio = 0.75  # changed at inference
    assert model.num_kept() == [16, 4, 1] and model.forward_encoder(x).final.shape == (1, 2, 48)
    assert model(x).shape == (1, 2, 32, 32, 32)


def test_layer_ids_for_layer_wise_decay():
    with torch.device("meta"):
        for name in ("unetr", "stp_mta_unetr"):
            model = create_model(name, preset="btcv", num_layers=10)
            ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
            assert model.num_layers == 10
            assert {i for n, i in ids.items() if "patch_embed" in n or "pos_embed" in n or "cls_token" in n} == {0}
            assert {i for n, i in ids.items() if ".blocks.9." in n and "completion" not in n} == {10}
            assert {i for n, i in ids.items() if n.startswith(("decoder.", "completion.", "encoder.scorers"))} == {11}


@pytest.mark.parametrize("name,kw,match", [
    ("unetr", dict(img_size=30), "30"),
    ("unetr", dict(patch_size=16, decoder="v1"), "'v1' needs patch_size 8"),
    ("unetr", dict(patch_size=16, decoder="v2"), "'v2' needs patch_size 8"),
    ("unetr", dict(patch_size=8, decoder="original"), "'original' needs patch_size 16"),
    ("unetr", dict(patch_size=4), "patch_size 4"),
    ("unetr", dict(decoder="v3"), "'v3'"),
    ("unetr", dict(img_size=24, decoder="v2"), r"\(3, 3, 3\)"),
    ("unetr", dict(skip_layers=(1, 2)), r"\(1, 2\)"),
    ("unetr", dict(skip_layers=(1, 2, 5)), r"\(1, 2, 5\)"),
    ("unetr", dict(num_heads=5), "num_heads 5"),
    ("stp_mta_unetr", dict(prune_ratio=1.0), "1.0"),
    ("stp_mta_unetr", dict(completion_size=40), "40"),
    ("stp_mta_unetr", dict(completion="interp"), "'interp'"),
    ("stp_mta_unetr", dict(scorer="random"), "'random'"),
])
def test_bad_model_arguments(name, kw, match):
    base = dict(in_channels=1, out_channels=2, img_size=32, **TINY_VIT)
    if name == "stp_mta_unetr":
        base.update(TINY_SPARSE)
    elif "skip_layers" not in kw and kw.get("decoder") != "original":
        base["skip_layers"] = (1, 2, 3)
    with pytest.raises(ValueError, match=match):
        create_model(name, **{**base, **kw})


@pytest.mark.parametrize("decoder,patch", [("original", 16), ("v2", 8)])
def test_instance_norm_decoder_matches_monai_instance_norm(decoder, patch):
    """"instance" is built as ChannelInstanceNorm3d and decoded channels-last on the CPU: the same state_dict and,
    to float32 rounding, the same logits as MONAI's InstanceNorm3d run channels-first."""
    torch.manual_seed(0)
    kw = dict(in_channels=1, out_channels=3, img_size=32, patch_size=patch, decoder=decoder, **TINY_VIT,
              skip_layers=(1, 2, 3))
    ours = create_model("unetr", **kw).eval()
    monai_norm = create_model("unetr", norm_name=("instance", {"affine": False}), **kw).eval()
    assert any(isinstance(m, ChannelInstanceNorm3d) for m in ours.decoder.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in monai_norm.decoder.modules())
    assert list(ours.state_dict()) == list(monai_norm.state_dict())
    monai_norm.load_state_dict(ours.state_dict())
    monai_norm.decoder.to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        logits = ours(x)
        ref = monai_norm(x)
    assert logits.is_contiguous()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_instance_norm_is_instance_norm(channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    y = ChannelInstanceNorm3d(4)(x)
    x_ref = x.detach().contiguous().requires_grad_()
    ref = torch.nn.functional.instance_norm(x_ref)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        ChannelInstanceNorm3d(3)(x)


@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr"])
def test_drop_path_rate_reaches_the_vit_blocks(name):
    with torch.device("meta"):
        model = create_model(name, preset="btcv", drop_path_rate=0.1)
        plain = create_model(name, preset="btcv")
    rates = [blk.drop_path.drop_prob for blk in model.vit.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert list(model.state_dict()) == list(plain.state_dict())
    if name == "stp_mta_unetr":  # the completion Transformer has none (the authors' FusionNet blocks)
        assert {blk.drop_path.drop_prob for blk in model.completion.blocks} == {0.0}
