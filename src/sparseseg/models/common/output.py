"""The contract between every segmentation model and the code that trains it.

* ``model.eval()``: ``model(x)`` returns logits ``[B, out_channels, D, H, W]`` (a plain tensor).
* ``model.train()``: ``model(x, target=None)`` returns a :class:`SegmentationOutput`. ``aux_losses`` holds
  already-weighted scalar losses that the trainer adds to the segmentation loss (e.g. the DynamicViT ratio
  loss, VQ and boundary losses of TokenSeg, SDKT losses of VeloxSeg); ``deep_supervision`` holds extra
  lower-resolution logits, finest first, which the trainer scores against a resized target (a no-op for logits
  already at the input size); ``deep_supervision_weights`` optionally gives the relative weights of
  ``[logits, *deep_supervision]`` (normalised to sum to 1 by the loss; default ``1, 1/2, 1/4, ...``).
  ``target`` is the training label as the loss sees it (``[B, 1, D, H, W]`` class indices for softmax
  datasets, ``[B, C, D, H, W]`` multi-hot regions for sigmoid datasets); only models whose auxiliary losses
  need the label read it, and they skip those losses when it is ``None``.

Everything goes through ``forward`` so that DistributedDataParallel sees every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationOutput:
    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    deep_supervision: list[torch.Tensor] = field(default_factory=list)
    deep_supervision_weights: list[float] | None = None


def foreground_mask(target: torch.Tensor) -> torch.Tensor:
    """Boolean foreground ``[B, 1, D, H, W]`` of a training target in either layout above."""
    if target.shape[1] == 1:
        return target > 0
    return (target > 0).any(dim=1, keepdim=True)
