"""TokenSeg: :mod:`.model` (the registered ``tokenseg``), :mod:`.blocks`, :mod:`.vq` (the VQ-VAE tokenizer) and
:mod:`.boundary` (label boundary bands and the boundary fraction of selected tokens)."""

from __future__ import annotations

from sparseseg.models.tokenseg.model import TokenSeg

__all__ = ["TokenSeg"]
