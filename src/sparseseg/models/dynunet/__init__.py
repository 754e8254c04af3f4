"""The CNN reference ``dynunet``: :mod:`.plan` (nnU-Net v2's topology rule) and :mod:`.model` (MONAI's DynUNet
built from it, with nnU-Net's deep supervision)."""

from __future__ import annotations

from sparseseg.models.dynunet.model import NNUNetStyleDynUNet
from sparseseg.models.dynunet.plan import UNetPlan, plan_unet

__all__ = ["NNUNetStyleDynUNet", "UNetPlan", "plan_unet"]
