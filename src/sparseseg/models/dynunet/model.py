"""``dynunet``: the CNN reference, MONAI's ``DynUNet`` with the plan nnU-Net v2 makes for the ROI and spacing.

The network is :class:`monai.networks.nets.DynUNet` (input block, strided-conv downsamplings, bottleneck,
transposed-conv upsamplings with skip concatenation, 1^3 output conv; two 3^3 conv + InstanceNorm (affine) +
LeakyReLU(0.01) per block), built from :func:`~sparseseg.models.dynunet.plan.plan_unet` (strides, kernels, 32 ... 320
channels). In eval mode ``forward`` is MONAI's own forward (no deep-supervision head runs). In training the same
blocks run in the same order and the deep-supervision heads (1^3 convs, MONAI's ``UnetOutBlock``) read the decoder
levels at 1/2, 1/4, ... of the input size: nnU-Net supervises every decoder level but the lowest with weights
1, 1/2, 1/4, ... (normalised), the lowest one weighted 0, so ``num_stages - 3`` heads give its loss exactly. Their
logits stay at their own size; the training loss resizes the target (nearest) to each, as nnU-Net does.

Differences from nnU-Net's ``PlainConvUNet`` (docs/models.md): MONAI's convolutions have no bias (each is followed
by an instance norm, which removes a bias), its transposed convolutions have one here (``trans_bias=True``, as
nnU-Net's), and the patch is the preset's ROI rather than the one nnU-Net would fit to a GPU memory target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.nets import DynUNet

from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import register_model
from sparseseg.models.dynunet.plan import BASE_FEATURES, MAX_FEATURES, MIN_FEATURE_MAP_SIZE, plan_unet

TRAINING_ONLY = ("ds_heads.",)  # parameter prefixes not used at inference


class NNUNetStyleDynUNet(nn.Module):
    """MONAI's DynUNet planned as nnU-Net plans its 3D U-Net, with nnU-Net's deep supervision in training.

    Args:
        in_channels, out_channels: image channels and output classes / regions.
        img_size: the training ROI (int or ``(D, H, W)``): the patch the plan is made for.
        spacing: the target spacing in mm (float or 3 floats) the plan is made for (kernels of 1 along an axis
            twice as coarse as the others, no downsampling along it until it catches up).
        min_feature_map_size, base_features, max_features: nnU-Net's planning constants (4, 32, 320).
        deep_supervision: in training, also return the logits of the decoder levels nnU-Net weights (all but the
            full resolution and the lowest): ``num_stages - 3`` of them.
        dropout_rate: dropout in every block (nnU-Net: none).

    Examples:
        >>> model = NNUNetStyleDynUNet(in_channels=4, out_channels=3, img_size=128)
        >>> model.plan.strides[:2], model.plan.filters
        (((1, 1, 1), (2, 2, 2)), (32, 64, 128, 256, 320, 320))
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 2,
        img_size: int | Sequence[int] = 96,
        spacing: float | Sequence[float] = 1.0,
        min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
        base_features: int = BASE_FEATURES,
        max_features: int = MAX_FEATURES,
        deep_supervision: bool = True,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.plan = plan_unet(img_size, spacing, min_feature_map_size=min_feature_map_size,
                              base_features=base_features, max_features=max_features)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.net = DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                           kernel_size=self.plan.kernel_size, strides=self.plan.strides,
                           upsample_kernel_size=self.plan.strides[1:], filters=self.plan.filters,
                           dropout=dropout_rate or None, norm_name=("INSTANCE", {"affine": True}),
                           act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}), trans_bias=True)
        num_heads = max(self.plan.num_stages - 3, 0) if deep_supervision else 0
        self.ds_heads = nn.ModuleList(UnetOutBlock(3, self.plan.filters[s], out_channels)
                                      for s in range(1, 1 + num_heads))  # decoder levels 1/2, 1/4, ...
        self.ds_heads.apply(DynUNet.initialize_weights)

    def _decode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder features, finest first (``[B, filters[s], D / 2^s, ...]`` for an isotropic plan): the blocks
        of ``self.net`` in the order of MONAI's forward."""
        skips = [self.net.input_block(x)]  # [B, F_0, D, H, W]
        for down in self.net.downsamples:
            skips.append(down(skips[-1]))  # [B, F_s, D_s, H_s, W_s]
        h = self.net.bottleneck(skips[-1])
        levels = []
        for up, skip in zip(self.net.upsamples, reversed(skips), strict=True):  # coarsest first
            h = up(h, skip)  # [B, F_s, D_s, H_s, W_s]
            levels.insert(0, h)
        return levels

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | SegmentationOutput:
        """``[B, in_channels, D, H, W]`` -> logits ``[B, out_channels, D, H, W]`` (eval) or a SegmentationOutput
        with the deep-supervision logits ``[B, out_channels, D / 2^s, ...]``, s = 1 .. ``num_stages - 3``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        if not self.training:
            return self.net(x)
        levels = self._decode_levels(x)
        ds = [head(level) for head, level in zip(self.ds_heads, levels[1:], strict=False)]
        return SegmentationOutput(logits=self.net.output_block(levels[0]), deep_supervision=ds,
                                  deep_supervision_weights=[0.5**i for i in range(1 + len(ds))])

    def inference_parameters(self) -> int:
        """Parameters used at inference (all but the deep-supervision heads)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(TRAINING_ONLY))


register_model(
    "dynunet",
    presets={
        "btcv": {"spacing": [1.5, 1.5, 2.0]},  # the BTCV recipe's target spacing; 96^3 -> 5 stages
        "brats": {"spacing": [1.0, 1.0, 1.0]},  # the BraTS recipe's; 128^3 -> 6 stages
    },
)(NNUNetStyleDynUNet)

__all__ = ["NNUNetStyleDynUNet"]
