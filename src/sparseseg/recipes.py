"""Training recipes: a recipe name -> the TrainConfig field values it sets (``model_args`` allowed)."""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # VeloxSeg as its authors train it: AdamW lr 2.5e-4, weight decay 0.01, default betas, batch 2 of 96^3 crops,
    # 300 epochs: 10 of linear warm-up, then cosine to 6e-6 (docs/veloxseg.md, "Training recipe").
    "veloxseg": {
        "model": "veloxseg",
        "lr": 2.5e-4,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "layer_decay": 1.0,
        "batch_size": 2,
        "roi_size": [96, 96, 96],
        "epochs": 300,
        "warmup_fraction": 10 / 300,
        "min_lr_ratio": 6e-6 / 2.5e-4,
    },
}
