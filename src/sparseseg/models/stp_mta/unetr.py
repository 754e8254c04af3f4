"""UNETR (dense baseline) and STP + MTA + UNETR (the paper's sparse pipeline), registered as ``unetr`` and
``stp_mta_unetr``.

* ``unetr``: dense encoding -> dense decoding. The decoder reads the block outputs listed in ``skip_layers`` and the
  final (normalised) tokens as its bottleneck.
* ``stp_mta_unetr``: sparse encoding (:mod:`~.pruning`) -> token completion
  (:mod:`~.completion`) -> dense decoding, the completed map replacing every decoder input (paper
  section 2.3, Fig. 1).

Block indices are 1-based block counts everywhere (``3`` = the output of the third block). Both models expose
``forward_encoder(x)`` (patch embedding + blocks + scorers), ``pruning_policy(x)`` and, for layer-wise lr decay,
``num_layers`` and ``layer_id(param_name)``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from sparseseg.models.common.blocks import block_grid
from sparseseg.models.common.decoders import DECODERS, build_decoder
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import register_model
from sparseseg.models.common.sparse_decoding import SparseDecoding, check_decoder
from sparseseg.models.common.tokens import num_keep
from sparseseg.models.common.vit import ViT3d, tokens_to_map
from sparseseg.models.stp_mta.completion import build_completion
from sparseseg.models.stp_mta.pruning import SparseEncoding, SparseViTEncoder

REFINE_BLOCK = 16  # full-resolution side of a refined block (docs/models.md, "Sparse decoding")
_VIT_B = {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}
PRESETS_DENSE = {"btcv": {"patch_size": 8, "decoder": "v2"},
                 "brats": {"patch_size": 8, "decoder": "v1", "sigmoid": True}}
PRESETS_SPARSE = {"btcv": {**PRESETS_DENSE["btcv"], "prune_ratio": 0.9},
                  "brats": {**PRESETS_DENSE["brats"], "prune_ratio": 0.75}}


def default_skip_layers(num_layers: int, num_skips: int) -> tuple[int, ...]:
    """Decoder taps spread over the depth: the outputs of blocks ``floor(k L / (n + 1)) + 1``, ``k = 1..n``
    (1-based; repeats only when there are fewer blocks than taps).

    For ViT-B (12 blocks) these are the authors' and MONAI's taps, ``hidden_states_out[3/6/9]`` and ``[4/8]`` of a
    list appended after every block: blocks 4/7/10 for three skips (decoders ``original`` and ``v2``), 5/9 for two
    (``v1``).

    Examples:
        >>> default_skip_layers(12, 3), default_skip_layers(12, 2), default_skip_layers(6, 3), default_skip_layers(3, 3)
        ((4, 7, 10), (5, 9), (2, 4, 5), (1, 2, 3))
    """
    return tuple(k * num_layers // (num_skips + 1) + 1 for k in range(1, num_skips + 1))


class DecoderInputs(NamedTuple):
    """What an encoder hands the decoder: skip maps and bottleneck (``[B, hidden, *grid_size]`` each), the
    auxiliary losses and, for sparse encoders, the pruning depth ``[B, N]`` (where to refine)."""

    skips: list[torch.Tensor]
    bottleneck: torch.Tensor
    aux_losses: dict[str, torch.Tensor] | None = None
    depth: torch.Tensor | None = None


def _default_decoder(decoder: str | None, patch_size: int) -> str:
    if decoder is not None:
        return decoder
    return "original" if patch_size == 16 else "v2"


class _UnetrBase(nn.Module, abc.ABC):
    """Decoder parts shared by both models; the subclass registers the ViT (``self.vit`` or ``self.encoder.vit``)."""

    def __init__(self, *, vit: ViT3d, in_channels: int, out_channels: int, patch_size: int, feature_size: int,
                 norm_name: str | tuple, decoder: str | None, refine_fraction: float, refine_score: str,
                 refine_block: int | None, sigmoid: bool):
        super().__init__()
        decoder = _default_decoder(decoder, patch_size)
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; valid decoders: {', '.join(DECODERS)}")
        self.grid_size = vit.grid_size
        self.patch_size = patch_size
        self.num_layers = len(vit.blocks)
        self.decoder_name = decoder
        self.decoder = build_decoder(decoder, patch_size=patch_size, grid_size=self.grid_size, in_channels=in_channels,
                                     out_channels=out_channels, hidden_size=vit.hidden_size,
                                     feature_size=feature_size, norm_name=norm_name)
        self.sparse_decoding = SparseDecoding(in_channels, 2 * feature_size, out_channels,
                                              refine_fraction=refine_fraction,
                                              refine_score=refine_score, sigmoid=sigmoid,
                                              block_size=REFINE_BLOCK if refine_block is None else refine_block)
        self.refine_fraction = refine_fraction  # checks the decoder when below 1

    @property
    def refine_fraction(self) -> float:
        """Share of the full-resolution blocks the decoder computes, in (0, 1]; 1 = dense decoding (the paper's).
        A plain runtime attribute: the parameters do not depend on it."""
        return self.sparse_decoding.refine_fraction

    @refine_fraction.setter
    def refine_fraction(self, value: float) -> None:
        if float(value) < 1.0:
            check_decoder(self.decoder)  # ValueError for a decoder it cannot run (e.g. batch norm)
        self.sparse_decoding.refine_fraction = value

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay id of a parameter: 0 = embeddings and [CLS], ``b + 1`` = block ``b`` (0-based),
        ``num_layers + 1`` = everything else (scorers, final norm, completion, decoder)."""
        parts = name.split(".")
        if "vit" in parts:
            rest = parts[parts.index("vit") + 1:]
            if rest[0] in ("patch_embed", "cls_token", "pos_embed"):
                return 0
            if rest[0] == "blocks":
                return int(rest[1]) + 1
        return self.num_layers + 1

    @abc.abstractmethod
    def _decoder_inputs(self, x: torch.Tensor) -> DecoderInputs:
        """Encoder (+ completion) of ``x`` ``[B, C_in, D, H, W]``: what the decoder reads (each model's own)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | SegmentationOutput:
        inputs = self._decoder_inputs(x)
        logits, coarse = self.sparse_decoding(self.decoder, x, inputs.skips, inputs.bottleneck, inputs.depth,
                                              self.patch_size)
        if not self.training:
            return logits  # [B, out_channels, D, H, W]
        return SegmentationOutput(logits, dict(inputs.aux_losses or {}), deep_supervision=[coarse])

    @torch.no_grad()
    def refined_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Which full-resolution blocks the decoder computes at the current ``refine_fraction`` (all at 1), as
        ``[B, *block_grid]`` bool (blocks of ``sparse_decoding.block_size`` voxels, raster order); the inference
        selection (call it on an eval-mode model)."""
        sd = self.sparse_decoding
        grid = block_grid(x.shape[2:], sd.block_size)
        if self.refine_fraction >= 1.0:
            return torch.ones(x.shape[0], *grid, dtype=torch.bool, device=x.device)
        inputs = self._decoder_inputs(x)
        fill = sd.fill(x, self.decoder.decode_coarse(inputs.skips, inputs.bottleneck))
        idx = sd.select(fill, inputs.depth, self.patch_size).idx  # [B, K]
        chosen = torch.zeros(x.shape[0], math.prod(grid), dtype=torch.bool, device=x.device)
        return chosen.scatter_(1, idx, True).view(x.shape[0], *grid)


@register_model("unetr", presets=PRESETS_DENSE)
class UNETR(_UnetrBase):
    """Dense UNETR: 3D ViT + UNETR decoder, ``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]``.

    Args:
        in_channels, out_channels, img_size: geometry (``img_size`` an int or three ints, divisible by the patch).
        patch_size: 8 (decoders ``v1``/``v2``) or 16 (decoder ``original``).
        feature_size: decoder width at full resolution (16). hidden_size, mlp_dim, num_layers, num_heads: the ViT
            (ViT-B = 768, 3072, 12, 12). dropout_rate: ViT dropout (training only). qkv_bias: qkv projection bias.
        drop_path_rate: stochastic depth of the last ViT block, rising linearly from 0 at the first (training only;
            0.1 in the authors' BTCV runs).
        norm_name: MONAI norm of the decoder blocks ("instance").
        decoder: "original" | "v1" | "v2"; None = "original" for patch 16, "v2" for patch 8.
        skip_layers: 1-based blocks whose outputs feed the decoder skips, shallow to deep; None = spread over the
            depth (:func:`default_skip_layers`): with 12 blocks 4/7/10 (``original``, ``v2``) and 5/9 (``v1``), the
            authors' and MONAI's ``hidden_states_out[3/6/9]`` and ``[4/8]``.
        refine_fraction: share of the full-resolution blocks decoded, in (0, 1]; 1 = dense decoding. A runtime
            attribute (:mod:`~sparseseg.models.common.sparse_decoding`).
        refine_score: where to refine below 1: "margin" | "entropy" (uncertainty of the coarse prediction) |
            "depth" (STP pruning depth; the dense model falls back to "margin").
        refine_block: full-resolution side of a refined block (even); None = 16.
        sigmoid: outputs are sigmoid regions (BraTS) rather than softmax classes: how the coarse prediction's
            uncertainty is read (set from the data by ``sparseseg train``).

    Examples:
        >>> model = UNETR(in_channels=1, out_channels=2, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96,
        ...               num_layers=4, num_heads=3, feature_size=8, skip_layers=(1, 2, 3)).eval()
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2, 32, 32, 32])
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int = 14, img_size: int | Sequence[int] = 96,
                 patch_size: int = 8, feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072,
                 num_layers: int = 12, num_heads: int = 12, dropout_rate: float = 0.0, qkv_bias: bool = True,
                 norm_name: str | tuple = "instance", decoder: str | None = None,
                 skip_layers: Sequence[int] | None = None, drop_path_rate: float = 0.0,
                 refine_fraction: float = 1.0, refine_score: str = "margin", refine_block: int | None = None,
                 sigmoid: bool = False):
        vit = ViT3d(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
                    mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate,
                    qkv_bias=qkv_bias, drop_path_rate=drop_path_rate)
        super().__init__(vit=vit, in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
                         feature_size=feature_size, norm_name=norm_name, decoder=decoder,
                         refine_fraction=refine_fraction, refine_score=refine_score, refine_block=refine_block,
                         sigmoid=sigmoid)
        self.vit = vit
        skips = (default_skip_layers(num_layers, self.decoder.num_skips) if skip_layers is None
                 else tuple(int(s) for s in skip_layers))
        if len(skips) != self.decoder.num_skips or any(not 1 <= s <= num_layers for s in skips):
            raise ValueError(f"skip_layers must be {self.decoder.num_skips} block indices in [1, {num_layers}] for "
                             f"decoder {self.decoder_name!r}, got {skips}")
        self.skip_layers = skips

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``[B, C_in, D, H, W]`` -> final tokens ``[B, 1 + N, C]`` (normalised) and the skip block outputs
        (each ``[B, 1 + N, C]``, in ``skip_layers`` order)."""
        z = self.vit.embed(x)  # [B, 1 + N, C]
        taps: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.vit.blocks):
            z, _ = blk(z)
            if i + 1 in self.skip_layers:
                taps[i + 1] = z
        return self.vit.norm(z), [taps[s] for s in self.skip_layers]

    def _decoder_inputs(self, x: torch.Tensor) -> DecoderInputs:
        final, taps = self.forward_encoder(x)
        skips = [tokens_to_map(t[:, 1:], self.grid_size) for t in taps]  # [B, N, C] -> [B, C, d, h, w]
        return DecoderInputs(skips, tokens_to_map(final[:, 1:], self.grid_size))

    @torch.no_grad()
    def pruning_policy(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` long: every patch token goes through all blocks, so every entry is ``num_layers``."""
        return torch.full((x.shape[0], self.vit.num_tokens), self.num_layers, dtype=torch.long, device=x.device)


@register_model("stp_mta_unetr", presets=PRESETS_SPARSE)
class STPMTAUNETR(_UnetrBase):
    """STP + MTA + UNETR, ``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]`` (paper Fig. 1).

    Args (beyond :class:`UNETR`'s, which keep their meaning):
        prune_ratio: r in [0, 1); each stage keeps floor((1 - r) L) of the L alive patch tokens. A plain runtime
            attribute (``model.prune_ratio = 0.5`` at inference); the parameters do not depend on it.
        prune_after: 1-based blocks after which a pruning stage runs, strictly increasing, in [1, num_layers).
        scorer: "mlp" (STP) | "cls_attention" (EViT) | "dynamic" (DynamicViT; ratio loss as ``aux_losses["ratio"]``).
        completion: "mta" | "mim". perturbation: "gumbel" | "none" (straight-through top-K without noise).
        tau: soft top-K temperature (paper Table 4d: 0.01, 0.1, 1).
        completion_size, completion_depth, completion_heads: width C (divisible by 6), blocks and heads of the
            completion Transformer (768, 1, 12).
        pruned_mask: where MTA multiplies each pruned token by its straight-through ``1 - M`` in training:
            "before_norm" (the authors' code: the group's LayerNorm cancels it, so only the kept tokens train the
            scorer) | "after_norm" (both groups train it). See :mod:`~.completion`.
        refine_fraction, refine_score, refine_block, sigmoid: sparse decoding, as in :class:`UNETR`.
        drop_background: inference only: patch tokens whose input patch equals ``background_value`` in every voxel
            and channel are dropped before the first block and completed by MTA as tokens pruned by the first stage;
            each stage then keeps a fraction ``1 - r`` of the tokens it receives (docs/models.md, "Background
            tokens"). A plain runtime attribute, like ``prune_ratio``; training with it on raises ValueError.
        background_value: the input value of background voxels (0 for MRI after ``NormalizeIntensity(nonzero=True)``,
            the CT window's ``b_min`` for CT); ``sparseseg predict`` sets it from the checkpoint's data config.

    Examples:
        >>> model = STPMTAUNETR(in_channels=1, out_channels=2, img_size=32, hidden_size=48, mlp_dim=96,
        ...                     num_layers=4, num_heads=3, feature_size=8, prune_after=(1, 2, 3),
        ...                     completion_size=48, completion_heads=3, prune_ratio=0.5).eval()
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2, 32, 32, 32])
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int = 14, img_size: int | Sequence[int] = 96,
                 patch_size: int = 8, feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072,
                 num_layers: int = 12, num_heads: int = 12, dropout_rate: float = 0.0, qkv_bias: bool = True,
                 norm_name: str | tuple = "instance", decoder: str | None = None, prune_ratio: float = 0.75,
                 prune_after: Sequence[int] = (3, 6, 9), scorer: str = "mlp", completion: str = "mta",
                 perturbation: str = "gumbel", tau: float = 1.0, completion_size: int = 768,
                 completion_depth: int = 1, completion_heads: int = 12, drop_path_rate: float = 0.0,
                 pruned_mask: str = "before_norm", refine_fraction: float = 1.0, refine_score: str = "margin",
                 refine_block: int | None = None, sigmoid: bool = False, drop_background: bool = False,
                 background_value: float = 0.0):
        vit = ViT3d(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
                    mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, dropout_rate=dropout_rate,
                    qkv_bias=qkv_bias, drop_path_rate=drop_path_rate)
        super().__init__(vit=vit, in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
                         feature_size=feature_size, norm_name=norm_name, decoder=decoder,
                         refine_fraction=refine_fraction, refine_score=refine_score, refine_block=refine_block,
                         sigmoid=sigmoid)
        self.prune_ratio = prune_ratio
        self.drop_background = drop_background
        self.background_value = background_value
        self.encoder = SparseViTEncoder(vit, prune_after, scorer=scorer, perturbation=perturbation, tau=tau)
        self.completion = build_completion(completion, num_groups=len(self.encoder.prune_after) + 1,
                                           hidden_size=hidden_size, grid_size=self.grid_size, width=completion_size,
                                           depth=completion_depth, num_heads=completion_heads, qkv_bias=qkv_bias,
                                           dropout_rate=dropout_rate, pruned_mask=pruned_mask)

    @property
    def vit(self) -> ViT3d:
        return self.encoder.vit

    @property
    def prune_ratio(self) -> float:
        return self._prune_ratio

    @prune_ratio.setter
    def prune_ratio(self, value: float) -> None:
        num_keep(1, float(value))  # ValueError naming the value when outside [0, 1)
        self._prune_ratio = float(value)

    @property
    def drop_background(self) -> bool:
        return self._drop_background

    @drop_background.setter
    def drop_background(self, value: bool) -> None:
        self._drop_background = bool(value)

    @property
    def background_value(self) -> float:
        return self._background_value

    @background_value.setter
    def background_value(self, value: float) -> None:
        if not math.isfinite(float(value)):
            raise ValueError(f"background_value must be a finite number, got {value}")
        self._background_value = float(value)

    def num_kept(self, num_tokens: int | None = None) -> list[int]:
        """Patch tokens alive after each pruning stage at the current ``prune_ratio``, starting from ``num_tokens``
        tokens in the first block (default all; fewer when background tokens are dropped)."""
        return self.encoder.num_kept(self.prune_ratio, num_tokens)

    def forward_encoder(self, x: torch.Tensor) -> SparseEncoding:
        """Patch embedding + blocks + scorers (no completion, no decoder); see :class:`SparseEncoding`."""
        return self.encoder(x, self.prune_ratio, background_value=self._background())

    def _background(self) -> float | None:
        return self.background_value if self.drop_background else None

    def _decoder_inputs(self, x: torch.Tensor) -> DecoderInputs:
        enc = self.forward_encoder(x)
        feat = tokens_to_map(self.completion(enc), self.grid_size)  # [B, N, C] -> [B, C, d, h, w]
        return DecoderInputs([feat] * self.decoder.num_skips, feat, enc.aux_losses, enc.depth)

    @torch.no_grad()
    def pruning_policy(self, x: torch.Tensor) -> torch.Tensor:
        """Depth at which each patch token was dropped, ``[B, N]`` long in raster order of the patch grid.

        The entry is the 1-based block after which the token was pruned (a ``prune_after`` value, = the number of
        blocks it went through); tokens kept to the end read ``num_layers``, background tokens dropped before the
        first block (``drop_background``) 0. Always the deterministic (inference)
        policy at the current ``prune_ratio``. Reshape to ``[B, *grid_size]`` for a picture."""
        return self.encoder(x, self.prune_ratio, stochastic=False, background_value=self._background()).depth
