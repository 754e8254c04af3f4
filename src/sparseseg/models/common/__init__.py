"""Parts every model family shares: the registry (:mod:`.registry`), the training/inference output contract
(:mod:`.output`), pure token operations (:mod:`.tokens`), the plain 3D ViT (:mod:`.vit`), the UNETR decoders
(:mod:`.decoders`) and layers (:mod:`.norms`, :mod:`.conv`). Nothing here imports a method's package."""
