"""Sliding-window logits over a whole volume with MONAI's inferer (Gaussian blending), shared by ``predict``,
training-time validation and the demo's timing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

Network = Callable[[torch.Tensor], torch.Tensor]  # a model, or a wrapper of one (sparseseg.inference.cuda_graphs)


def sliding_window_logits(model: Network, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int = 4,
                          overlap: float = 0.5, sw_device: torch.device | None = None,
                          device: torch.device | None = None) -> torch.Tensor:
    """Logits ``[B, K, D, H, W]`` of an eval-mode model over a whole volume ``[B, C, D, H, W]`` (Gaussian
    blending of ROI windows; a volume smaller than the ROI is padded and the result cropped back). AMP on CUDA.

    As in MONAI, ``sw_device`` is where the windows run (the model's device; default: the image's) and ``device``
    where the whole-volume output is stitched (default: the image's): a large volume can stay on the CPU while
    its windows run on the GPU, so only ``sw_batch_size`` windows ever occupy GPU memory.
    """
    sw_device = sw_device or image.device
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=sw_device.type == "cuda"):
        logits = sliding_window_inference(image, list(roi_size), sw_batch_size, model, overlap=overlap,
                                          mode="gaussian", sw_device=sw_device, device=device or image.device)
    return logits.float()
