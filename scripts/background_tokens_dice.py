"""Dice and time of a trained model with and without background token dropping, on the demo's brain template
(docs/models.md, "Background tokens").

    python -m sparseseg demo --output DEMO          # trains unetr and stp_mta_unetr (or reuse a demo folder)
    python scripts/background_tokens_dice.py DEMO

Two cases, each predicted with ``sparseseg.inference.predict`` (defaults: overlap 0.5, 4 windows per call, CPU
fast path) by every checkpoint in ``DEMO/runs/*/last.pt``, drop off and (token models) drop on, one after the other:

* ``demo block``: the demo's test input (the anterior block cropped to the brain's bounding box plus 4 voxels, its
  cut face padded by edge replication), scored on the block;
* ``whole head``: the same anterior part of the uncropped template (zeros around the head), its cut face padded the
  same way, scored on that part.

Dice per tissue class (``sparseseg.evaluation.metrics.mask_metrics``) and its mean; seconds of the ``predict`` call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from sparseseg.data.io import save_nifti
from sparseseg.demo.data import AP_AXIS, CLASS_NAMES, TEST_CASE, brain_box, load_template, replicate_pad
from sparseseg.evaluation.metrics import mask_metrics
from sparseseg.inference.predictor import predict
from sparseseg.models.stp_mta.background import foreground_patches


def whole_head_case(data: Path, work: Path, roi: int) -> tuple[Path, np.ndarray, int]:
    """The anterior part of the uncropped template at the demo's cut, padded in front like the demo's test input;
    returns the file, its reference labels and the pad."""
    meta = json.loads((data / "dataset.json").read_text())["split"]
    full = load_template(int(meta["resolution_mm"]))
    lo, _ = brain_box(full.label, 4)
    cut = lo[AP_AXIS] + int(meta["first_test_slice_in_crop"])
    image, label = full.image[:, cut:], full.label[:, cut:]
    pad = max(roi - image.shape[AP_AXIS], roi // 4)
    padded, affine = replicate_pad(image, full.affine, pad)
    return save_nifti(padded, work / "whole_head" / f"{TEST_CASE}.nii.gz", affine, dtype=np.float32), label, pad


def demo_case(demo: Path, roi: int) -> tuple[Path, np.ndarray, int]:
    padded = demo / "work" / "padded" / f"{TEST_CASE}.nii.gz"
    label = np.asarray(nib.load(str(demo / "data" / "labelsTs" / f"{TEST_CASE}.nii.gz")).dataobj)
    return padded, label, nib.load(str(padded)).shape[AP_AXIS] - label.shape[AP_AXIS]


def background_share(path: Path, patch: int = 8) -> float:
    """Share of all-zero patches over the image's patch tiling (zero-padded to whole patches)."""
    x = torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))[None, None]
    pads = [(-s) % patch for s in x.shape[2:]]
    x = torch.nn.functional.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
    return float((~foreground_patches(x, patch, 0.0)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="output folder of `sparseseg demo`")
    parser.add_argument("--roi", type=int, default=48, help="the demo's window side (48; 32 for --quick)")
    args = parser.parse_args()
    work = args.demo / "work" / "background_tokens"
    cases = {"demo block": demo_case(args.demo, args.roi),
             "whole head": whole_head_case(args.demo / "data", work, args.roi)}
    checkpoints = sorted(args.demo.glob("runs/*/last.pt"))
    print(f"torch threads: {torch.get_num_threads()}")
    print("| case | zero patches | model | drop | " + " | ".join(f"Dice {c}" for c in CLASS_NAMES[1:])
          + " | mean Dice | predict (s) |")
    print("|---|---|---|---|" + "---|" * (len(CLASS_NAMES) - 1) + "---|---|")
    for case, (path, label, pad) in cases.items():
        share = background_share(path)
        for ckpt in checkpoints:
            name = ckpt.parent.name
            for drop in ((False, True) if name == "stp_mta_unetr" else (False,)):
                out = work / f"{case.replace(' ', '_')}_{name}_{'drop' if drop else 'full'}"
                t0 = time.perf_counter()
                (pred_path,) = predict(ckpt, path, out, device="cpu", drop_background_tokens=drop)
                seconds = time.perf_counter() - t0
                pred = np.asarray(nib.load(str(pred_path)).dataobj)[:, pad:]  # [X, pad + Y, Z] -> [X, Y, Z]
                dice = [mask_metrics(pred == k, label == k, (2.0, 2.0, 2.0))["dice"]
                        for k in range(1, len(CLASS_NAMES))]
                print(f"| {case} | {share:.0%} | {name} | {'on' if drop else 'off'} | "
                      + " | ".join(f"{d:.4f}" for d in dice) + f" | {np.mean(dice):.4f} | {seconds:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
