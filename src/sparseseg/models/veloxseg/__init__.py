"""VeloxSeg: :mod:`.model` (the registered ``veloxseg``), :mod:`.blocks` (the convolution stream's JLC),
:mod:`.pwa` (the transformer stream: paired window attention) and :mod:`.sdkt` (Gram-matrix knowledge transfer,
training only)."""

from __future__ import annotations

from sparseseg.models.veloxseg.model import VeloxDecoder, VeloxSeg

__all__ = ["VeloxDecoder", "VeloxSeg"]
