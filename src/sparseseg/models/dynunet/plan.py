"""The network plan nnU-Net v2 makes for a 3D U-Net, as a pure function: :func:`plan_unet`.

nnU-Net's experiment planner (``nnunetv2/experiment_planning/experiment_planners/network_topology.py``,
``get_pool_and_conv_props``, with the defaults of ``default_experiment_planner.py``) derives the topology from the
patch size and the target spacing:

* an axis is downsampled (stride 2) while its feature map is at least ``2 * min_feature_map_size`` voxels (4 by
  default, so while >= 8) and its spacing is within a factor 2 of the finest spacing among those axes; a lone axis
  is only downsampled while it is at least ``3 * min_feature_map_size``; there is no other cap on the depth;
* the kernel of an axis is 1 until its (growing) spacing comes within a factor 2 of the finest spacing, then 3 for
  good (so isotropic and mildly anisotropic spacings get 3^3 everywhere); the bottleneck always has 3^3;
* stage ``s`` has ``min(base_features * 2^s, max_features)`` channels (32, 64, 128, 256, 320, 320, ...);
* the first stage has stride 1; the patch must be divisible by ``2^(downsamplings of each axis)``.

Examples: a 128^3 patch at 1 mm gives 6 stages (5 downsamplings to a 4^3 bottleneck), a 96^3 patch at
1.5 x 1.5 x 2.0 mm gives 5 stages (4 downsamplings to 6^3: 6 < 8 stops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_FEATURE_MAP_SIZE = 4  # nnU-Net v2: UNet_featuremap_min_edge_length
BASE_FEATURES = 32  # UNet_base_num_features
MAX_FEATURES = 320  # UNet_max_features_3d


@dataclass(frozen=True)
class UNetPlan:
    """Per stage, finest first: ``kernel_size`` and ``strides`` (3 ints each; ``strides[0]`` is all 1) and
    ``filters``; ``bottleneck_size`` is the feature-map size of the last stage."""

    kernel_size: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    filters: tuple[int, ...]
    bottleneck_size: tuple[int, int, int]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def divisor(self) -> tuple[int, int, int]:
        """What every input size must be divisible by, per axis (the product of the strides)."""
        return tuple(math.prod(s[d] for s in self.strides) for d in range(3))  # type: ignore[return-value]


def plan_unet(patch_size: int | Sequence[int], spacing: float | Sequence[float] = 1.0, *,
              min_feature_map_size: int = MIN_FEATURE_MAP_SIZE, base_features: int = BASE_FEATURES,
              max_features: int = MAX_FEATURES) -> UNetPlan:
    """nnU-Net's plan (module docstring) for a patch ``patch_size`` (int or 3 ints, voxels) at ``spacing`` (mm).

    Raises:
        ValueError: a non-positive size or spacing, or a patch that does not fit the plan (not divisible by its
            strides, or too small for the two downsamplings a U-Net needs).

    Examples:
        >>> plan_unet(128).filters
        (32, 64, 128, 256, 320, 320)
    """
    size = [int(patch_size)] * 3 if isinstance(patch_size, int) else [int(s) for s in patch_size]
    current = [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
    if len(size) != 3 or len(current) != 3 or min(size) < 1 or min(current) <= 0:
        raise ValueError(f"patch_size and spacing must be 3 positive values, got {patch_size} and {spacing}")
    if min_feature_map_size < 1 or base_features < 1 or max_features < base_features:
        raise ValueError(f"bad plan settings: min_feature_map_size={min_feature_map_size}, "
                         f"base_features={base_features}, max_features={max_features}")
    fmap = [float(s) for s in size]
    kernel = [1, 1, 1]
    kernels, strides = [], [(1, 1, 1)]
    while True:
        axes = [d for d in range(3) if fmap[d] >= 2 * min_feature_map_size]
        if not axes:
            break
        finest = min(current[d] for d in axes)
        axes = [d for d in axes if current[d] / finest < 2]
        if len(axes) == 1 and fmap[axes[0]] < 3 * min_feature_map_size:
            break
        kernel = [3 if k == 3 or current[d] / min(current) < 2 else 1 for d, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if d in axes else 1 for d in range(3)))
        for d in axes:
            current[d] *= 2
            fmap[d] = math.ceil(fmap[d] / 2)
    kernels.append((3, 3, 3))  # the bottleneck
    filters = tuple(min(base_features * 2**s, max_features) for s in range(len(strides)))
    plan = UNetPlan(tuple(kernels), tuple(strides), filters, tuple(int(f) for f in fmap))  # type: ignore[arg-type]
    if plan.num_stages < 3:
        raise ValueError(f"patch {tuple(size)} is too small for a U-Net: nnU-Net's rule downsamples it "
                         f"{plan.num_stages - 1} time(s), at least 2 are needed (patch >= {4 * min_feature_map_size})")
    bad = [s for s, div in zip(size, plan.divisor(), strict=True) if s % div]
    if bad:
        raise ValueError(f"patch {tuple(size)} must be divisible by {plan.divisor()} (its strides)")
    return plan
