"""Model zoo. Importing this package registers every model with :mod:`sparseseg.models.registry`."""

from __future__ import annotations

from sparseseg.models import (
    tokenseg,  # noqa: F401
    unetr,  # noqa: F401
    veloxseg,  # noqa: F401
)
from sparseseg.models.registry import create_model, list_models, list_presets, register_model

__all__ = ["create_model", "list_models", "list_presets", "register_model"]
