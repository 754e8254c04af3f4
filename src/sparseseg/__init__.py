"""sparseseg: fast 3D medical image segmentation with sparse visual tokens.

Public API::

    import sparseseg
    sparseseg.list_models()
    model = sparseseg.create_model("stp_mta_unetr", preset="brats")
"""

from __future__ import annotations

__version__ = "0.1.0"

from sparseseg.benchmark.flops import count_macs, count_params  # noqa: E402
from sparseseg.models.common.registry import create_model, list_models, list_presets  # noqa: E402

__all__ = ["__version__", "count_macs", "count_params", "create_model", "list_models", "list_presets"]
