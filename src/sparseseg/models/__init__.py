"""Model zoo, one sub-package per method; importing this package registers every model.

* :mod:`sparseseg.models.common`: the registry, the output contract, token operations, the plain 3D ViT, the UNETR
  decoders and shared layers;
* :mod:`sparseseg.models.stp_mta`: the dense ``unetr`` baseline and ``stp_mta_unetr`` (STP pruning, MTA completion);
* :mod:`sparseseg.models.tokenseg`: ``tokenseg`` (hierarchical encoder, VQ boundary-aware tokenizer, decoder);
* :mod:`sparseseg.models.veloxseg`: ``veloxseg`` (JLC, paired window attention, SDKT);
* :mod:`sparseseg.models.dynunet`: ``dynunet``, the CNN reference (MONAI's DynUNet with nnU-Net's plan).
"""

from __future__ import annotations

from sparseseg.models import (
    dynunet,  # noqa: F401
    stp_mta,  # noqa: F401
    tokenseg,  # noqa: F401
    veloxseg,  # noqa: F401
)
from sparseseg.models.common.registry import create_model, list_models, list_presets, register_model

__all__ = ["create_model", "list_models", "list_presets", "register_model"]
