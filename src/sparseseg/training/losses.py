"""The segmentation loss of the paper's recipe plus deep supervision and the model's auxiliary losses.

* softmax classes: MONAI ``DiceCELoss`` with Dice and cross-entropy weighted 1:1;
* sigmoid regions (BraTS TC/WT/ET): MONAI ``DiceLoss`` on sigmoid outputs;
* both with MONAI's ``squared_pred``, ``smooth_nr`` and ``smooth_dr`` options (config fields of the same names);
* deep supervision: each extra output (finest first) is scored against the target, nearest-resized to its size,
  with weight 1/2^i (i = 1, 2, ...) or the model's own ``deep_supervision_weights``; all weights (1 for the main
  output by default) are normalised to sum to 1;
* ``aux_losses`` of :class:`~sparseseg.models.common.output.SegmentationOutput` are already weighted: added as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from sparseseg.models.common.output import SegmentationOutput


class SegmentationLoss(nn.Module):
    """Total training loss. ``forward(output, target)`` returns ``(total, parts)`` where ``parts`` maps a name to
    a detached scalar for logging.

    Args:
        sigmoid: multi-hot region targets ``[B, R, D, H, W]`` (Dice on sigmoid) instead of class indices
            ``[B, 1, D, H, W]`` (Dice + CE on softmax).
        squared_pred, smooth_nr, smooth_dr: MONAI's Dice options (the authors' runs: True, 0, 1e-6).
    """

    def __init__(self, sigmoid: bool = False, squared_pred: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5):
        super().__init__()
        self.sigmoid = sigmoid
        dice = {"squared_pred": squared_pred, "smooth_nr": smooth_nr, "smooth_dr": smooth_dr}
        if sigmoid:
            self.seg = DiceLoss(sigmoid=True, **dice)
        else:
            self.seg = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=1.0, **dice)

    def _resized_target(self, target: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if target.shape[2:] == size:
            return target
        return F.interpolate(target.float(), size=size, mode="nearest")  # [B, C, D, H, W] -> [B, C, d, h, w]

    def forward(self, output: SegmentationOutput | torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(output, torch.Tensor):
            output = SegmentationOutput(output)
        target = target.float()
        outputs = [output.logits, *output.deep_supervision]
        weights = output.deep_supervision_weights or [0.5**i for i in range(len(outputs))]
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} deep supervision weights for {len(outputs)} outputs")
        weights = torch.tensor(weights, dtype=torch.float32)
        weights = weights / weights.sum()
        seg = sum(w * self.seg(o.float(), self._resized_target(target, o.shape[2:]))
                  for w, o in zip(weights, outputs, strict=True))
        parts = {"seg": float(seg.detach())}
        total = seg
        for name, value in output.aux_losses.items():
            total = total + value
            parts[name] = float(value.detach())
        return total, parts
