"""Sliding-window logits over a whole volume (Gaussian blending), shared by ``predict``, training-time validation
and the demo's timing.

:func:`sliding_window_logits` is MONAI's inferer. :func:`skipping_sliding_window` places and blends the windows
exactly as MONAI does (same positions, same Gaussian weights) but does not run the model on a window whose input is
the background value everywhere (MRI: the zeros around a skull-stripped head; CT: air, clipped to the window's
lower bound): such a window gets the output the model gives a constant background window, computed once per call.
The result is the same as running every window, to the float rounding of the batch composition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from tqdm import tqdm

Network = Callable[[torch.Tensor], torch.Tensor]  # a model, or a wrapper of one (sparseseg.inference.cuda_graphs)

SIGMA_SCALE = 0.125  # MONAI's default Gaussian width (sigma = 0.125 * ROI)


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


@dataclass
class WindowCounts:
    """Windows of one sliding window: ``run`` through the model, ``skipped`` as all background."""

    run: int = 0
    skipped: int = 0


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows of MONAI's sliding window over ``image_size`` (already padded to at least the ROI): a stride of
    ``int(roi * (1 - overlap))`` (at least 1; the ROI where it equals the image), the last window flush with the
    end; the last axis varies fastest."""
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(image_size, roi_size, strict=True)]
    return dense_patch_slices(list(image_size), list(roi_size), interval)


def _roi_padding(spatial: Sequence[int], roi_size: Sequence[int]) -> list[int]:
    """``F.pad`` widths (last axis first) that centre a volume smaller than the ROI in it, as MONAI pads."""
    pad: list[int] = []
    for s, r in zip(reversed(spatial), reversed(roi_size), strict=True):
        diff = max(r - s, 0)
        pad += [diff // 2, diff - diff // 2]
    return pad


@torch.inference_mode()
def skipping_sliding_window(model: Network, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int = 4,
                            overlap: float = 0.5, background: float | None = None,
                            sw_device: torch.device | None = None, device: torch.device | None = None,
                            counts: WindowCounts | None = None, progress: bool = False) -> torch.Tensor:
    """Logits ``[1, K, D, H, W]`` of an eval-mode model over one volume ``[1, C, D, H, W]``, with MONAI's windows
    and Gaussian blending; a window whose input equals ``background`` everywhere is not run (None: run all).

    Args:
        model: eval-mode network, ``[N, C, *roi] -> [N, K, *roi]``.
        image: the preprocessed volume (a volume smaller than the ROI is padded with 0 and cropped back, as MONAI).
        roi_size, sw_batch_size, overlap: as :func:`monai.inferers.sliding_window_inference`.
        background: the preprocessed background intensity (:func:`sparseseg.inference.whole_scan.background_value`).
        sw_device: where the windows run (default: the image's); ``device``: where the output is stitched.
        counts: filled with the number of windows run and skipped.
        progress: a tqdm bar over the windows (shown on a terminal only).
    """
    if image.shape[0] != 1:
        raise ValueError(f"one volume at a time, got a batch of {image.shape[0]}")
    sw_device = sw_device or image.device
    device = device or image.device
    roi = [int(r) for r in roi_size]
    spatial = list(image.shape[2:])
    pad = _roi_padding(spatial, roi)
    if any(pad):
        image = F.pad(image, pad, mode="constant", value=0.0)  # [1, C, D, H, W] -> [1, C, >=roi]
    size = list(image.shape[2:])
    slices = window_slices(size, roi, overlap)
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=SIGMA_SCALE, device=sw_device,
                                    dtype=image.dtype)[None, None]  # [1, 1, *roi]
    counts = counts if counts is not None else WindowCounts()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=sw_device.type == "cuda"):
            return model(batch.to(sw_device)).to(image.dtype) * weight  # [N, C, *roi] -> [N, K, *roi]

    blank = None
    if background is not None:  # the output of every all-background window
        blank = forward(torch.full((1, image.shape[1], *roi), background, dtype=image.dtype)).to(device)[0]
    output = torch.zeros((1, blank.shape[0], *size), dtype=image.dtype, device=device) if blank is not None else None
    norm = torch.zeros((1, 1, *size), dtype=image.dtype, device=device)
    pending: list[tuple[slice, ...]] = []

    def run(windows: list[tuple[slice, ...]]) -> None:
        nonlocal output
        out = forward(torch.cat([image[(slice(None), slice(None), *s)] for s in windows])).to(device)
        if output is None:
            output = torch.zeros((1, out.shape[1], *size), dtype=image.dtype, device=device)
        for s, o in zip(windows, out, strict=True):
            output[(0, slice(None), *s)] += o
        counts.run += len(windows)

    w = weight.to(device)[0]
    for s in tqdm(slices, desc="windows", unit="window", leave=False, disable=None if progress else True):
        norm[(0, slice(None), *s)] += w
        window = image[(0, slice(None), *s)]
        if blank is not None and bool((window == background).all()):
            output[(0, slice(None), *s)] += blank
            counts.skipped += 1
            continue
        pending.append(s)
        if len(pending) == sw_batch_size:
            run(pending)
            pending = []
    if pending:
        run(pending)
    output /= norm
    del norm
    if any(pad):  # crop the padding back off
        crop = [slice(pad[2 * i], pad[2 * i] + spatial[-1 - i]) for i in range(len(spatial))][::-1]
        output = output[(slice(None), slice(None), *crop)]
    return output
