"""Synthetic whole scans of real sizes and untrained checkpoints, for the whole-case benchmark (docs/benchmark.md,
"Whole scans").

* ``mri/brats_syn_0000.nii.gz`` .. ``_0003``: a BraTS-size MRI case, 4 channels of 240 x 240 x 155 at 1 mm: an
  ellipsoid "brain" (18 % of the voxels) of N(300, 100) intensities in each channel, zeros around (skull-stripped);
* ``ct/ct_syn.nii.gz``: an abdominal CT of 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm (LPS axes, as scanners write
  them): an elliptic body (an elliptic cylinder along the slices) of N(40, 30) HU in air at -1000 HU, int16;
* ``checkpoints/``: untrained checkpoints, ``create_model(name, preset)`` with the preset's preprocessing
  (:func:`sparseseg.benchmark.case.preset_data_config`): ``brats_<model>.pt`` and ``btcv_<model>.pt`` for each
  ``--models`` entry, and the tiny CT model, a 3-block ``unetr`` of the ``btcv`` preset with patch 16 (ViT-B width,
  the ``original`` decoder), once with the BTCV preprocessing (``ct_tiny_btcv.pt``: resampled to
  1.5 x 1.5 x 2.0 mm and back) and once without resampling or foreground crop (``ct_tiny_native.pt``).

Everything is seeded (``--seed``). Example::

    python scripts/synthetic_case.py --output synthetic --models unetr,stp_mta_unetr,dynunet
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from sparseseg.benchmark.case import preset_data_config, untrained_checkpoint

log = logging.getLogger("synthetic_case")

MRI_SHAPE = (240, 240, 155)
BRAIN_FRACTION = 0.18
CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.8, 0.8, 1.5)


def _ellipsoid(shape: tuple[int, ...], semi_axes: tuple[float, ...]) -> np.ndarray:
    """Boolean ellipsoid (or, with an infinite semi-axis, elliptic cylinder) centred in ``shape``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - (n - 1) / 2) / a) ** 2 for g, n, a in zip(grids, shape, semi_axes, strict=True))
    return r2 <= 1.0


def mri_case(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Four channels ``[X, Y, Z]`` (float32), the 1 mm affine and the brain's share of the voxels."""
    # An ellipsoid with semi-axes k * (X, Y, Z) / 2 fills (4/3) pi k^3 / 8 of the box.
    k = (BRAIN_FRACTION * 6 / np.pi) ** (1 / 3)
    brain = _ellipsoid(MRI_SHAPE, tuple(k * n / 2 for n in MRI_SHAPE))
    rng = np.random.default_rng(seed)
    channels = []
    for _ in range(4):
        image = np.zeros(MRI_SHAPE, dtype=np.float32)
        image[brain] = rng.normal(300.0, 100.0, size=int(brain.sum())).astype(np.float32)
        channels.append(image)
    return channels, np.eye(4), float(brain.mean())


def ct_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """The CT ``[X, Y, Z]`` (int16 HU), its LPS affine and the body's share of the voxels."""
    body = _ellipsoid(CT_SHAPE, (0.45 * CT_SHAPE[0], 0.33 * CT_SHAPE[1], np.inf))  # 0.45 / 0.33 of the field of view
    rng = np.random.default_rng(seed)
    image = np.full(CT_SHAPE, -1000, dtype=np.int16)
    image[body] = np.clip(np.rint(rng.normal(40.0, 30.0, size=int(body.sum()))), -1024, 3071).astype(np.int16)
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])  # LPS voxel axes in RAS world
    return image, affine, float(body.mean())


def write_checkpoints(out: Path, models: list[str], seed: int = 0) -> list[Path]:
    """Untrained ``brats`` and ``btcv`` checkpoints of ``models`` and the two tiny CT checkpoints."""
    from sparseseg.checkpoint import save_checkpoint
    from sparseseg.models.common.registry import create_model

    written = []
    for preset in ("brats", "btcv"):
        for name in models:
            written.append(untrained_checkpoint(name, preset, out / f"{preset}_{name}.pt", seed))
            log.info("wrote %s", written[-1])
    tiny = {"num_layers": 3, "patch_size": 16, "decoder": "original"}
    written.append(untrained_checkpoint("unetr", "btcv", out / "ct_tiny_btcv.pt", seed, **tiny))
    native = preset_data_config("btcv")
    native.target_spacing, native.crop_foreground = None, False
    import torch

    torch.manual_seed(seed)
    written.append(save_checkpoint(out / "ct_tiny_native.pt", create_model("unetr", "btcv", **tiny), native.to_dict()))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write mri/, ct/ and checkpoints/ into")
    parser.add_argument("--kind", choices=["mri", "ct", "all", "none"], default="all", help="which scans to write")
    parser.add_argument("--models", default="unetr,stp_mta_unetr,dynunet",
                        help="comma-separated models to write untrained brats and btcv checkpoints of")
    parser.add_argument("--no-checkpoints", action="store_true", help="write the scans only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.output)
    if args.kind in ("mri", "all"):
        channels, affine, share = mri_case(args.seed)
        for c, image in enumerate(channels):
            path = out / "mri" / f"brats_syn_{c:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, affine), str(path))
        log.info("wrote %s (4 x %s, brain %.1f %% of the voxels)", out / "mri", MRI_SHAPE, 100 * share)
    if args.kind in ("ct", "all"):
        image, affine, share = ct_case(args.seed)
        path = out / "ct" / "ct_syn.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), str(path))
        log.info("wrote %s (%s at %s mm, body %.1f %% of the voxels)", path, CT_SHAPE, CT_SPACING, 100 * share)
    if not args.no_checkpoints:
        write_checkpoints(out / "checkpoints", [m.strip() for m in args.models.split(",") if m.strip()], args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
