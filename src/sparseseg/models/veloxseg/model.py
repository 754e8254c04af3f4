"""VeloxSeg: a lightweight dual-stream CNN-Transformer with paired window attention, JL-guided convolutions and
spatially decoupled knowledge transfer (SDKT). See ``docs/veloxseg.md`` for the design and measured numbers.

* Encoder (:meth:`VeloxSeg.forward_encoder`): a conv stream (7^3 stride-4 stem, one JLC block per stage) and a
  transformer stream (one 4^3 patch embedding per modality, one PWA block per stage, joint attention across the
  modalities); ``stem_stride`` (default 4, the authors' value) sets both stems and the head; at every stage a
  1x1 conv + InstanceNorm mixer adds the transformer features into the conv stream; both streams are downsampled
  2x between stages.
* Decoder: transposed-conv upsampling, additive skips, one JLC block per level, a 3^3 conv + 4x pixel-shuffle
  head back to the input resolution, 1x1 deep-supervision heads on the lower levels (training only).
* SDKT (training only): one reconstruction decoder per modality, fed by that modality's transformer-stream
  features, reconstructs its input (MSE); the Gram matrices of the segmentation decoder's last level and of each
  reconstruction decoder's last level are matched (MSE). In eval these decoders are not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from sparseseg.models.common.norms import affine_instance_norm
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import register_model
from sparseseg.models.veloxseg.blocks import JLC, PWABlock, num_pwa_scales, paired_windows, pixel_shuffle_3d
from sparseseg.models.veloxseg.sdkt import gram_matrix, sdkt_losses

STEM_STRIDE = 4  # the authors' stem: 7^3 stride 4 (conv stream), 4^3 patches (token stream), 4x pixel-shuffle head


def _as_size3(size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(size) != 3:
        raise ValueError(f"img_size must be an int or three ints, got {size}")
    return size  # type: ignore[return-value]


def _per_stage(name: str, values: Sequence[int], num_stages: int) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) < num_stages:
        raise ValueError(f"{name} needs one value per stage ({num_stages}), got {values}")
    return values[:num_stages]


class VeloxDecoder(nn.Module):
    """Transposed-conv up, additive skip, JLC per level, 3^3 conv + pixel-shuffle head.

    ``forward(skips)`` takes the stage features finest first (``skips[s]``: ``[B, C_s, D_s, H_s, W_s]``) and returns
    ``(logits [B, out_channels, D_0 * stem_stride, ...], levels)`` with ``levels[s]`` the decoder feature at stage
    ``s``, finest first, for ``s < num_stages - 1``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        group_channels: Sequence[int],
        expansion: Sequence[int],
        out_channels: int,
        stem_stride: int = STEM_STRIDE,
    ) -> None:
        super().__init__()
        n = len(channels)
        self.stem_stride = stem_stride
        self.ups = nn.ModuleList(nn.ConvTranspose3d(channels[s + 1], channels[s], 2, stride=2) for s in range(n - 1))
        self.blocks = nn.ModuleList(JLC(channels[s], group_channels[s], expansion[s]) for s in range(n - 1))
        self.head = nn.Conv3d(channels[0], out_channels * stem_stride**3, 3, padding=1)

    def forward(self, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = skips[-1]
        levels: list[torch.Tensor] = []
        for s in reversed(range(len(self.ups))):
            x = self.blocks[s](self.ups[s](x) + skips[s])  # [B, C_s, D_s, H_s, W_s]
            levels.insert(0, x)
        head_in = levels[0] if levels else x
        return pixel_shuffle_3d(self.head(head_in), self.stem_stride), levels  # [B, out, D_0*r, H_0*r, W_0*r]


class VeloxSeg(nn.Module):
    """VeloxSeg for 3-D segmentation of one or several co-registered modalities.

    Args:
        in_channels: input channels (sum of ``modalities``).
        out_channels: output classes / regions.
        img_size: training ROI (int or ``(D, H, W)``); fixes the number of PWA scales of each stage.
        channels: width of each stage (1 to 4 stages).
        modalities: channels of each modality's transformer stream, e.g. ``[1, 1]`` for PET/CT or ``[4]`` for the
            four BraTS sequences in one stream; default ``[in_channels]``.
        num_heads / head_dim: attention heads per scale and their q/k/v width, per stage.
        group_channels: channels per group of the JLC grouped convolutions (the JL bound), per stage.
        ffn_expansion: JLC FFN and PWA MLP expansion, per stage.
        window_ratio: pooled tokens per window side (27 tokens per window for 3).
        deep_supervision: return lower-resolution logits in training.
        sdkt: build the reconstruction decoders and return the SDKT losses in training.
        recon_weight / gram_weight: weights of the reconstruction and Gram-matching losses.
        stem_stride: downsampling of the stems and upsampling of the pixel-shuffle head (authors: 4; the conv
            stem's kernel is ``2 * stem_stride - 1``). 2 keeps thin structures of coarse (2 mm) scans.

    Examples:
        >>> model = VeloxSeg(in_channels=2, out_channels=2, img_size=96, modalities=(1, 1))
        >>> model.eval()(torch.zeros(1, 2, 96, 96, 96)).shape
        torch.Size([1, 2, 96, 96, 96])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 2,
        img_size: int | Sequence[int] = 96,
        channels: Sequence[int] = (16, 32, 64, 128),
        modalities: Sequence[int] | None = None,
        num_heads: Sequence[int] = (1, 2, 2, 4),
        head_dim: Sequence[int] = (4, 8, 8, 16),
        group_channels: Sequence[int] = (4, 8, 8, 16),
        ffn_expansion: Sequence[int] = (3, 3, 2, 2),
        window_ratio: int = 3,
        deep_supervision: bool = True,
        sdkt: bool = True,
        recon_weight: float = 0.5,
        gram_weight: float = 2.0,
        stem_stride: int = STEM_STRIDE,
    ) -> None:
        super().__init__()
        if stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
        modalities = tuple(modalities) if modalities is not None else (in_channels,)
        if sum(modalities) != in_channels or min(modalities) < 1:
            raise ValueError(f"modalities {modalities} must be positive and sum to in_channels={in_channels}")
        n = len(channels)
        if not 1 <= n <= 4:
            raise ValueError(f"channels must have 1 to 4 stages, got {tuple(channels)}")
        channels = tuple(channels)
        heads, dims = _per_stage("num_heads", num_heads, n), _per_stage("head_dim", head_dim, n)
        groups = _per_stage("group_channels", group_channels, n)
        expansion = _per_stage("ffn_expansion", ffn_expansion, n)
        self.in_channels, self.out_channels, self.img_size = in_channels, out_channels, _as_size3(img_size)
        self.channels, self.modalities, self.window_ratio = channels, modalities, window_ratio
        self.deep_supervision, self.recon_weight, self.gram_weight = deep_supervision, recon_weight, gram_weight
        self.stem_stride = stem_stride
        self.num_scales = self._scales_per_stage(self.img_size)
        m = len(modalities)

        r = stem_stride
        self.conv_stem = nn.Conv3d(in_channels, channels[0], 2 * r - 1, stride=r, padding=r - 1)
        self.token_stems = nn.ModuleList(nn.Conv3d(c, channels[0], r, stride=r) for c in modalities)
        self.conv_blocks = nn.ModuleList(JLC(channels[s], groups[s], expansion[s]) for s in range(n))
        self.token_blocks = nn.ModuleList(
            PWABlock(channels[s], m, self.num_scales[s], heads[s], dims[s], expansion[s], window_ratio)
            for s in range(n)
        )
        self.mixers = nn.ModuleList(
            nn.Sequential(nn.Conv3d(m * channels[s], channels[s], 1), affine_instance_norm(channels[s]))
            for s in range(n)
        )
        # Conv stream: overlapping kernels (2 * stride - 1, as its 7^3 stride-4 stem); token stream: patch merging.
        self.conv_downs = nn.ModuleList(
            nn.Conv3d(channels[s], channels[s + 1], 3, stride=2, padding=1) for s in range(n - 1)
        )
        self.token_downs = nn.ModuleList(
            nn.Conv3d(m * channels[s], m * channels[s + 1], 2, stride=2, groups=m) for s in range(n - 1)
        )
        self.decoder = VeloxDecoder(channels, groups, expansion, out_channels, r)
        self.ds_heads = nn.ModuleList(nn.Conv3d(channels[s], out_channels, 1) for s in range(n - 1))
        self.reconstruction = nn.ModuleList(
            VeloxDecoder(channels, groups, expansion, c, r) for c in (modalities if sdkt else ())
        )

    def _stage_sizes(self, size: Sequence[int]) -> list[list[int]]:
        """Feature-map size of each stage for an input of ``size``; ValueError when the strides do not divide it."""
        r = self.stem_stride
        factor = r * 2 ** (len(self.channels) - 1)
        if any(n % factor for n in size):
            raise ValueError(f"input size {tuple(size)} must be divisible by {factor} (stem {r} x {factor // r})")
        return [[n // (r * 2**s) for n in size] for s in range(len(self.channels))]

    def _scales_per_stage(self, size: Sequence[int]) -> tuple[int, ...]:
        """PWA scales of each stage: windows double until one covers the stage's map (ValueError if none tiles)."""
        scales = []
        for stage in self._stage_sizes(size):
            k = max(num_pwa_scales(n, self.window_ratio) for n in stage)
            paired_windows(stage, k, self.window_ratio)  # validates the tiling
            scales.append(k)
        return tuple(scales)

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both streams: ``[B, in, D, H, W] -> (conv features [B, C_s, ...], token features [B, M * C_s, ...])``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        for s, size in enumerate(self._stage_sizes(x.shape[2:])):
            # The scale count is fixed by img_size; its coarsest scale is global at any input size.
            paired_windows(size, self.num_scales[s], self.window_ratio)  # raises ValueError before any compute
        modal_inputs = x.split(list(self.modalities), dim=1)
        c = self.conv_stem(x)  # [B, C_0, D/r, H/r, W/r], r = stem_stride
        t = torch.cat([stem(xi) for stem, xi in zip(self.token_stems, modal_inputs, strict=True)], 1)  # [B, M*C_0, ...]
        conv_feats, token_feats = [], []
        for s in range(len(self.channels)):
            if s > 0:
                c, t = self.conv_downs[s - 1](c), self.token_downs[s - 1](t)  # 2x down, C_{s-1} -> C_s
            t = self.token_blocks[s](t)
            c = self.conv_blocks[s](c) + self.mixers[s](t)
            conv_feats.append(c)
            token_feats.append(t)
        return conv_feats, token_feats

    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Dual-stream encoder: the fused features of each stage, finest first
        (``[B, C_s, D / (stem_stride * 2^s), ...]``)."""
        return self._encode(x)[0]

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | SegmentationOutput:
        """``[B, in_channels, D, H, W]`` -> logits ``[B, out_channels, D, H, W]`` (eval) or a SegmentationOutput."""
        conv_feats, token_feats = self._encode(x)
        logits, levels = self.decoder(conv_feats)
        if not self.training:
            return logits
        ds = [head(level) for head, level in zip(self.ds_heads, levels, strict=True)] if self.deep_supervision else []
        aux: dict[str, torch.Tensor] = {}
        if len(self.reconstruction) > 0:
            aux = self._sdkt(x, token_feats, levels[0] if levels else conv_feats[0])
        return SegmentationOutput(logits=logits, aux_losses=aux, deep_supervision=ds)

    def _sdkt(
        self, x: torch.Tensor, token_feats: list[torch.Tensor], seg_level: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run one reconstruction decoder per modality on its own token features; return the weighted losses."""
        m = len(self.modalities)
        recons, recon_grams = [], []
        for i, decoder in enumerate(self.reconstruction):
            skips = [t.unflatten(1, (m, -1))[:, i] for t in token_feats]  # [B, C_s, ...] of modality i
            recon, levels = decoder(skips)
            recons.append(recon)
            recon_grams.append(gram_matrix(levels[0] if levels else skips[0]))
        targets = x.split(list(self.modalities), dim=1)
        return sdkt_losses(recons, targets, gram_matrix(seg_level), recon_grams, self.recon_weight, self.gram_weight)

    def inference_parameters(self) -> int:
        """Parameters used at inference (everything but the training-only reconstruction decoders)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("reconstruction."))


register_model(
    "veloxseg",
    presets={
        "btcv": {"modalities": [1]},
        # 128^3 / 4 = 32 is not a multiple of 3: use 4^3 = 64 pooled tokens per window (32, 16, 8, 4 tile by 4).
        "brats": {"modalities": [4], "window_ratio": 4},
    },
)(VeloxSeg)

__all__ = ["VeloxDecoder", "VeloxSeg"]
