"""VeloxSeg: a lightweight dual-stream CNN-Transformer with paired window attention, JL-guided convolutions and
spatially decoupled knowledge transfer (SDKT), built as in the authors' code (``docs/veloxseg.md``, item by item).

* Encoder (:meth:`VeloxSeg.forward_encoder`): a transformer stream (one 4^3 patch embedding per modality, one PWA
  block per stage with joint attention across the modalities, LayerNorm + linear patch merging between stages) and a
  conv stream (7^3 stride-4 conv + InstanceNorm stem, 3^3 stride-2 conv + InstanceNorm downsampling). At every
  stage a 1x1 conv + InstanceNorm mixer adds the transformer features to the conv map, then the stage's JLC block
  runs: ``c_s = JLC_s(down(c_{s-1}) + mix_s(t_s))``. ``stem_stride`` (default 4, the authors' value) sets both stems
  and the head.
* Decoder: transposed conv + InstanceNorm up, additive skip, one JLC block per level, a 3^3 conv + pixel-shuffle
  head; in training, 1x1 deep-supervision heads on decoder levels 2 and 3 and the bottleneck, their logits upsampled
  (trilinear) to the input size and weighted equally with the main output.
* SDKT (training only): one reconstruction decoder per modality reads that modality's transformer features together
  with the fused conv features (1x1 conv + InstanceNorm adapters) and reconstructs the input (MSE); the Gram matrices
  of the last level of the segmentation decoder and of each reconstruction decoder are matched (MSE). In eval these
  decoders are not run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import register_model
from sparseseg.models.veloxseg.blocks import JLC, conv_norm, instance_norm, pixel_shuffle_3d
from sparseseg.models.veloxseg.pwa import ModalLinear, ModalPatchMerging, PWABlock, Size3, check_windows, paired_windows
from sparseseg.models.veloxseg.sdkt import gram_matrix, sdkt_losses

TRAINING_ONLY = ("reconstruction.", "ds_heads.")  # parameter prefixes not used at inference
STEM_STRIDE = 4  # the authors' stem: 7^3 stride 4 (conv stream), 4^3 patches (token stream), 4x pixel-shuffle head


def _as_size3(size: int | Sequence[int], name: str) -> Size3:
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {size}")
    return size  # type: ignore[return-value]


def _per_stage(name: str, values: Sequence, num_stages: int) -> tuple:
    values = tuple(values)
    if len(values) < num_stages:
        raise ValueError(f"{name} needs one value per stage ({num_stages}), got {values}")
    return values[:num_stages]


class VeloxDecoder(nn.Module):
    """Transposed conv + InstanceNorm up, additive skip, JLC per level, 3^3 conv + pixel-shuffle head.

    ``forward(skips)`` takes the stage features finest first (``skips[s]``: ``[B, C_s, D_s, H_s, W_s]``, or
    ``skip_channels[s]`` channels when given: each then passes a 1x1 conv + InstanceNorm adapter to ``C_s``) and
    returns ``(logits [B, out_channels, D_0 * stem_stride, ...], levels)``: ``levels[s]`` is the decoder feature at
    stage ``s`` (finest first) and ``levels[-1]`` the bottleneck it started from.
    """

    def __init__(
        self,
        channels: Sequence[int],
        group_channels: Sequence[int],
        expansion: Sequence[int],
        out_channels: int,
        stem_stride: int = STEM_STRIDE,
        dropout_rate: float = 0.0,
        skip_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        n = len(channels)
        self.stem_stride = stem_stride
        self.adapters = nn.ModuleList(
            conv_norm(c_in, c, 1) for c_in, c in zip(skip_channels or (), channels, strict=False)
        )
        self.ups = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose3d(channels[s + 1], channels[s], 2, stride=2), instance_norm(channels[s]))
            for s in range(n - 1)
        )
        self.blocks = nn.ModuleList(
            JLC(channels[s], group_channels[s], expansion[s], dropout_rate=dropout_rate) for s in range(n - 1)
        )
        self.head = nn.Conv3d(channels[0], out_channels * stem_stride**3, 3, padding=1)

    def forward(self, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(self.adapters) > 0:
            skips = [adapter(skip) for adapter, skip in zip(self.adapters, skips, strict=True)]
        x = skips[-1]
        levels = [x]
        for s in reversed(range(len(self.ups))):
            x = self.blocks[s](skips[s] + self.ups[s](x))  # [B, C_s, D_s, H_s, W_s]
            levels.insert(0, x)
        return pixel_shuffle_3d(self.head(x), self.stem_stride), levels  # [B, out, D_0*r, H_0*r, W_0*r]


class VeloxSeg(nn.Module):
    """VeloxSeg for 3-D segmentation of one or several co-registered modalities.

    Args:
        in_channels: input channels (sum of ``modalities``).
        out_channels: output classes / regions.
        img_size: training ROI (int or ``(D, H, W)``); fixes the PWA windows of each stage.
        channels: width of each stage, both streams (1 to 4 stages).
        modalities: channels of each modality's transformer stream, e.g. ``[1, 1]`` for PET/CT or ``[4]`` for the
            four BraTS sequences in one stream; default ``[in_channels]``.
        num_heads: attention heads per PWA scale, per stage.
        head_dim: query/key width per head, per stage (the JL bound); the value width is rounded up so that the
            values of all scales and heads hold at least the stage width (:class:`PairedWindowAttention`).
        group_channels: channels per group of the JLC grouped convolutions (the JL bound), per stage.
        ffn_expansion: JLC FFN and PWA MLP expansion, per stage.
        window_size / small_window_size: the first PWA scale's big window and the small window it is max-pooled by,
            per stage (int or three ints); both double at each further scale while the big window fits the map.
        dropout_rate: dropout after the patch embeddings, the attention output projection and in the PWA MLP.
        attn_dropout_rate: dropout on the attention weights.
        conv_dropout_rate: dropout at the end of every JLC feed-forward network.
        deep_supervision: in training, also return the logits of decoder levels 2, 3 and the bottleneck, upsampled
            to the input size, weighted equally with the main output.
        sdkt: build the reconstruction decoders and return the SDKT losses in training.
        recon_weight / gram_weight: weights of the reconstruction and Gram-matching losses.
        gram_detach: stop the Gram loss's gradient into the reconstruction decoders (the authors let it flow).
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
        window_size: Sequence[int | Sequence[int]] = (3, 6, 3, 3),
        small_window_size: Sequence[int | Sequence[int]] = (1, 1, 1, 1),
        dropout_rate: float = 0.1,
        attn_dropout_rate: float = 0.1,
        conv_dropout_rate: float = 0.1,
        deep_supervision: bool = True,
        sdkt: bool = True,
        recon_weight: float = 0.5,
        gram_weight: float = 2.0,
        gram_detach: bool = False,
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
        big = [_as_size3(w, "window_size") for w in _per_stage("window_size", window_size, n)]
        small = [_as_size3(w, "small_window_size") for w in _per_stage("small_window_size", small_window_size, n)]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.img_size = _as_size3(img_size, "img_size")
        self.channels, self.modalities, self.stem_stride = channels, modalities, stem_stride
        self.deep_supervision, self.recon_weight, self.gram_weight = deep_supervision, recon_weight, gram_weight
        self.gram_detach = gram_detach
        self.windows = [paired_windows(size, b, s) for size, b, s in zip(self._stage_sizes(self.img_size), big, small,
                                                                        strict=True)]
        m, r = len(modalities), stem_stride

        self.conv_stem = conv_norm(in_channels, channels[0], 2 * r - 1, stride=r)
        self.token_stems = nn.ModuleList(nn.Conv3d(c, channels[0], r, stride=r) for c in modalities)
        self.token_dropout = nn.Dropout(dropout_rate)
        self.token_blocks = nn.ModuleList(
            PWABlock(channels[s], m, self.windows[s], heads[s], dims[s], expansion[s], dropout_rate, attn_dropout_rate)
            for s in range(n)
        )
        self.token_downs = nn.ModuleList(ModalPatchMerging(channels[s], channels[s + 1], m) for s in range(n - 1))
        self.mixers = nn.ModuleList(conv_norm(m * c, c, 1) for c in channels)
        self.conv_downs = nn.ModuleList(conv_norm(channels[s], channels[s + 1], 3, stride=2) for s in range(n - 1))
        self.conv_blocks = nn.ModuleList(
            JLC(channels[s], groups[s], expansion[s], dropout_rate=conv_dropout_rate) for s in range(n)
        )
        self.decoder = VeloxDecoder(channels, groups, expansion, out_channels, r, conv_dropout_rate)
        # Deep supervision on decoder levels 1 .. n-2 and the bottleneck (level n-1); level 0 is the main head.
        self.ds_heads = nn.ModuleList(nn.Conv3d(c, out_channels, 1) for c in (channels[1:] if deep_supervision else ()))
        self.reconstruction = nn.ModuleList(
            VeloxDecoder(channels, groups, expansion, c, r, conv_dropout_rate, skip_channels=[2 * k for k in channels])
            for c in (modalities if sdkt else ())
        )
        self.apply(_he_init)

    @property
    def num_scales(self) -> tuple[int, ...]:
        """PWA scales of each stage."""
        return tuple(len(w) for w in self.windows)

    def _stage_sizes(self, size: Sequence[int]) -> list[list[int]]:
        """Feature-map size of each stage for an input of ``size``; ValueError when the strides do not divide it."""
        r = self.stem_stride
        factor = r * 2 ** (len(self.channels) - 1)
        if any(n % factor for n in size):
            raise ValueError(f"input size {tuple(size)} must be divisible by {factor} (stem {r} x {factor // r})")
        return [[n // (r * 2**s) for n in size] for s in range(len(self.channels))]

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both streams: ``[B, in, D, H, W] -> (fused conv features [B, C_s, ...], token features [B, M * C_s, ...])``
        (the token features channels first, modality-major)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}")
        for size, windows in zip(self._stage_sizes(x.shape[2:]), self.windows, strict=True):
            check_windows(size, windows)  # the windows are fixed by img_size: raise before any compute
        modal_inputs = x.split(list(self.modalities), dim=1)
        t = torch.stack([stem(xi).permute(0, 2, 3, 4, 1) for stem, xi in zip(self.token_stems, modal_inputs,
                                                                         strict=True)], 1)  # [B, M, D/r, H/r, W/r, C_0]
        t = self.token_dropout(t)
        c = self.conv_stem(x)  # [B, C_0, D/r, H/r, W/r], r = stem_stride
        conv_feats, token_feats = [], []
        for s in range(len(self.channels)):
            if s > 0:
                c, t = self.conv_downs[s - 1](c), self.token_downs[s - 1](t)  # 2x down, C_{s-1} -> C_s
            t = self.token_blocks[s](t)  # [B, M, D_s, H_s, W_s, C_s]
            tokens = t.permute(0, 1, 5, 2, 3, 4).flatten(1, 2)  # [B, M * C_s, D_s, H_s, W_s]
            c = self.conv_blocks[s](c + self.mixers[s](tokens))  # the transformer features join before the JLC
            conv_feats.append(c)
            token_feats.append(tokens)
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
        ds = [F.interpolate(head(level), size=x.shape[2:], mode="trilinear", align_corners=True)
              for head, level in zip(self.ds_heads, levels[1:], strict=False)]  # [B, out, D, H, W] each
        aux: dict[str, torch.Tensor] = {}
        if len(self.reconstruction) > 0:
            aux = self._sdkt(x, conv_feats, token_feats, levels[0])
        return SegmentationOutput(logits=logits, aux_losses=aux, deep_supervision=ds,
                                  deep_supervision_weights=[1.0] * (1 + len(ds)))

    def _sdkt(
        self, x: torch.Tensor, conv_feats: list[torch.Tensor], token_feats: list[torch.Tensor], seg_level: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One reconstruction decoder per modality on that modality's token features beside the fused conv features;
        return the weighted losses."""
        m = len(self.modalities)
        recons, recon_grams = [], []
        for i, decoder in enumerate(self.reconstruction):
            skips = [torch.cat([t.unflatten(1, (m, -1))[:, i], c], 1)  # [B, 2 C_s, ...]: modality i's tokens, conv
                     for t, c in zip(token_feats, conv_feats, strict=True)]
            recon, levels = decoder(skips)
            recons.append(recon)
            recon_grams.append(gram_matrix(levels[0]))
        return sdkt_losses(torch.cat(recons, 1), x, gram_matrix(seg_level), recon_grams, self.recon_weight,
                           self.gram_weight, self.gram_detach)

    def inference_parameters(self) -> int:
        """Parameters used at inference (everything but the training-only reconstruction decoders and the deep
        supervision heads)."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(TRAINING_ONLY))


def _he_init(module: nn.Module) -> None:
    """The authors' initialisation: He normal (leaky-ReLU slope 0.01) for every (transposed) convolution, zero bias;
    their per-modality 1x1 convolutions are our per-modality linear maps."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, ModalLinear)):
        for weight in module.weight if isinstance(module, ModalLinear) else [module.weight]:
            nn.init.kaiming_normal_(weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


register_model(
    "veloxseg",
    presets={
        "btcv": {"modalities": [1]},
        # The authors' BraTS setting: the four sequences in one stream, 96^3 crops (the shared brats ROI is 128^3).
        "brats": {"modalities": [4], "img_size": 96},
    },
)(VeloxSeg)

__all__ = ["VeloxDecoder", "VeloxSeg"]
