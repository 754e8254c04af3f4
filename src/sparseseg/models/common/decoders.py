"""UNETR decoders (SPEC section 1, "Decoders"), built from MONAI's UNETR blocks.

Every decoder maps the image ``x`` ``[B, C_in, D, H, W]``, ``num_skips`` encoder feature maps and one bottleneck map
(each ``[B, hidden, G_d, G_h, G_w]`` on the patch grid ``G = img / patch``) to logits ``[B, out_channels, D, H, W]``.
Skips are ordered shallow to deep (the shallowest is upsampled the most). With STP + MTA all of them are the same
completed map.

* ``"original"`` (patch 16, MONAI ``UNETR``): encoder2/3/4 = pr-up blocks to 8G/4G/2G, four up blocks.
* ``"v2"`` (patch 8, the paper's BTCV decoder): encoder2 = pr-up to 4G, encoder3 = pr-up to 2G, encoder4 = residual
  block at G, bottleneck = AvgPool3d(3, 2, 1) to G/2; up blocks hidden->8F (+enc4), 8F->4F (+enc3), 4F->2F (+enc2),
  2F->F (+enc1). Needs even grid sides of at least 4.
* ``"v1"`` (patch 8, the paper's BraTS decoder): encoder2 = pr-up to 4G, encoder3 = pr-up to 2G, bottleneck at G; up
  blocks hidden->4F (+enc3), 4F->2F (+enc2), 2F->F (+enc1).

``encoder1`` is a residual block on the image at full size (``feature_size`` channels) in all three; the head is a
1x1x1 convolution. ``F`` = ``feature_size``.

Speed on the CPU: the full-resolution levels dominate a decoder's time (about half of a pruned model's forward).
oneDNN convolves channels-last (NDHWC) maps with channels-last weights without reordering them to its blocked
layout and back, so :func:`build_decoder` stores the convolution weights channels-last and, on the CPU, every
decoder runs on channels-last maps and returns contiguous logits. The ``"instance"`` norm is built as
:class:`~.norms.ChannelInstanceNorm3d` (the same normalisation and the same empty ``state_dict`` as
MONAI's ``InstanceNorm3d``, with fast channels-last kernels). Measured at the brats decoder's full resolution
(16-32 x 128^3, two threads, one training forward): the 2^3 transposed conv 815 -> 20 ms, the 1^3 residual conv
809 -> 230 ms, the 3^3 convs 713 -> 557 and 665 -> 361 ms.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from sparseseg.models.common.context import eager_cpu
from sparseseg.models.common.norms import NORM_NAME

DECODERS = ("original", "v1", "v2")
DECODER_PATCH = {"original": 16, "v1": 8, "v2": 8}


def block_norm(norm_name: str | tuple) -> str | tuple:
    """The MONAI norm spec of a decoder block: ``"instance"`` (without arguments) becomes the equivalent
    :class:`~.norms.ChannelInstanceNorm3d`; anything else is passed through."""
    if norm_name == "instance" or norm_name == ("instance", {}):
        return NORM_NAME
    return norm_name


def _basic(cin: int, cout: int, norm_name: str | tuple) -> UnetrBasicBlock:
    return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=block_norm(norm_name),
                           res_block=True)


def _prup(cin: int, cout: int, num_layer: int, norm_name: str | tuple) -> UnetrPrUpBlock:
    """Transposed-conv upsampling by ``2^(num_layer + 1)`` with residual blocks in between."""
    return UnetrPrUpBlock(3, cin, cout, num_layer=num_layer, kernel_size=3, stride=1, upsample_kernel_size=2,
                          norm_name=block_norm(norm_name), conv_block=True, res_block=True)


def _up(cin: int, cout: int, norm_name: str | tuple) -> UnetrUpBlock:
    return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=block_norm(norm_name),
                        res_block=True)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in NDHWC memory in eager CPU runs (a no-op for the token maps, which are channels-last views already)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if eager_cpu(x) else x


class UnetrDecoder(nn.Module, abc.ABC):
    """Shared head: ``encoder1`` on the image and the 1x1x1 output block."""

    num_skips: int

    def __init__(self, in_channels: int, out_channels: int, feature_size: int, norm_name: str | tuple):
        super().__init__()
        self.encoder1 = _basic(in_channels, feature_size, norm_name)
        self.out = UnetOutBlock(3, feature_size, out_channels)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C_in, D, H, W]``, ``num_skips`` maps and the bottleneck ``[B, hidden, *G]`` -> logits
        ``[B, out_channels, D, H, W]`` (contiguous); channels-last inside on the CPU."""
        return self.decode_fine(x, self.decode_coarse(skips, bottleneck)).contiguous()

    def decode_coarse(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Every level below full resolution: the input of ``decoder2``, ``[B, 2F, D/2, H/2, W/2]`` (channels-last
        on the CPU). Sparse decoding (:mod:`~.sparse_decoding`) computes this part densely."""
        if len(skips) != self.num_skips:
            raise ValueError(f"{type(self).__name__} takes {self.num_skips} skip maps, got {len(skips)}")
        return self._decode(_channels_last(bottleneck), [_channels_last(s) for s in skips])

    def decode_fine(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The full-resolution level: ``encoder1`` on the image ``x``, the last up block on ``coarse`` and the head
        -> logits ``[B, out_channels, D, H, W]`` (channels-last on the CPU)."""
        return self.out(self.decoder2(coarse, self.encoder1(_channels_last(x))))

    @abc.abstractmethod
    def _decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """The levels below full resolution, on channels-last maps on the CPU (each subclass wires its own
        blocks)."""


class OriginalDecoder(UnetrDecoder):
    """MONAI UNETR decoder (patch 16): skips at 8G, 4G, 2G; bottleneck at G."""

    num_skips = 3

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int, feature_size: int = 16,
                 norm_name: str | tuple = "instance"):
        super().__init__(in_channels, out_channels, feature_size, norm_name)
        f = feature_size
        self.encoder2 = _prup(hidden_size, 2 * f, 2, norm_name)
        self.encoder3 = _prup(hidden_size, 4 * f, 1, norm_name)
        self.encoder4 = _prup(hidden_size, 8 * f, 0, norm_name)
        self.decoder5 = _up(hidden_size, 8 * f, norm_name)
        self.decoder4 = _up(8 * f, 4 * f, norm_name)
        self.decoder3 = _up(4 * f, 2 * f, norm_name)
        self.decoder2 = _up(2 * f, f, norm_name)

    def _decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        enc2, enc3, enc4 = self.encoder2(skips[0]), self.encoder3(skips[1]), self.encoder4(skips[2])
        d = self.decoder5(bottleneck, enc4)  # G -> 2G
        d = self.decoder4(d, enc3)  # 2G -> 4G
        return self.decoder3(d, enc2)  # 4G -> 8G (decoder2 then goes to 16G = full size)


class DecoderV2(UnetrDecoder):
    """Patch-8 decoder with a pooled bottleneck (paper's BTCV model): skips at 4G, 2G, G; bottleneck at G/2."""

    num_skips = 3

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int, feature_size: int = 16,
                 norm_name: str | tuple = "instance"):
        super().__init__(in_channels, out_channels, feature_size, norm_name)
        f = feature_size
        self.encoder2 = _prup(hidden_size, 2 * f, 1, norm_name)
        self.encoder3 = _prup(hidden_size, 4 * f, 0, norm_name)
        self.encoder4 = _basic(hidden_size, 8 * f, norm_name)
        self.pool = nn.AvgPool3d(kernel_size=3, stride=2, padding=1)
        self.decoder5 = _up(hidden_size, 8 * f, norm_name)
        self.decoder4 = _up(8 * f, 4 * f, norm_name)
        self.decoder3 = _up(4 * f, 2 * f, norm_name)
        self.decoder2 = _up(2 * f, f, norm_name)

    def _decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        enc2, enc3, enc4 = self.encoder2(skips[0]), self.encoder3(skips[1]), self.encoder4(skips[2])
        d = self.decoder5(self.pool(bottleneck), enc4)  # G -> G/2 -> G
        d = self.decoder4(d, enc3)  # G -> 2G
        return self.decoder3(d, enc2)  # 2G -> 4G (decoder2 then goes to 8G = full size)


class DecoderV1(UnetrDecoder):
    """Patch-8 decoder without pooling (paper's BraTS model): skips at 4G, 2G; bottleneck at G."""

    num_skips = 2

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int, feature_size: int = 16,
                 norm_name: str | tuple = "instance"):
        super().__init__(in_channels, out_channels, feature_size, norm_name)
        f = feature_size
        self.encoder2 = _prup(hidden_size, 2 * f, 1, norm_name)
        self.encoder3 = _prup(hidden_size, 4 * f, 0, norm_name)
        self.decoder4 = _up(hidden_size, 4 * f, norm_name)
        self.decoder3 = _up(4 * f, 2 * f, norm_name)
        self.decoder2 = _up(2 * f, f, norm_name)

    def _decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        enc2, enc3 = self.encoder2(skips[0]), self.encoder3(skips[1])
        d = self.decoder4(bottleneck, enc3)  # G -> 2G
        return self.decoder3(d, enc2)  # 2G -> 4G (decoder2 then goes to 8G = full size)


def build_decoder(name: str, *, patch_size: int, grid_size: Sequence[int], in_channels: int, out_channels: int,
                  hidden_size: int, feature_size: int = 16, norm_name: str | tuple = "instance") -> UnetrDecoder:
    """The decoder ``name`` for ``patch_size``; ValueError for an unknown name, a patch size it was not built for, or
    (``v2``) a patch grid with an odd side or one below 4."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; valid decoders: {', '.join(DECODERS)}")
    if DECODER_PATCH[name] != patch_size:
        raise ValueError(f"decoder {name!r} needs patch_size {DECODER_PATCH[name]}, got patch_size {patch_size}")
    if name == "v2" and any(g % 2 or g < 4 for g in grid_size):
        raise ValueError(f"decoder 'v2' pools the patch grid by 2 and needs even sides >= 4 (img_size a multiple of "
                         f"16, at least 32), got grid {tuple(grid_size)}")
    cls = {"original": OriginalDecoder, "v1": DecoderV1, "v2": DecoderV2}[name]
    decoder = cls(in_channels, out_channels, hidden_size, feature_size, norm_name)
    return decoder.to(memory_format=torch.channels_last_3d)  # conv weights channels-last (module docstring)
