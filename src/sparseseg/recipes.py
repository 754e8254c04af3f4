"""Named training recipes: sets of :class:`~sparseseg.config.TrainConfig` values (``sparseseg train --recipe NAME``
or the config key ``recipe``).

A recipe is a plain mapping of ``TrainConfig`` field names to values; ``model_args`` (constructor arguments) may be
part of it. Precedence: dataclass defaults < recipe < ``--config`` file < command-line flags, and ``model_args`` are
merged per key in the same order.

``btcv`` and ``brats`` are the STP + MTA paper's runs as the authors ran them (github.com/cvlab-stonybrook/
TokenSparse-for-MedSeg: ``configs/*.yaml``, the training commands of its README, ``lib/trainers/seg_trainer.py``,
``lib/data/med_transforms.py``), for ``unetr`` and ``stp_mta_unetr``. Where the code and the paper differ the code
is followed; docs/pipeline.md ("Training recipe") lists the differences and what is not matched. ``veloxseg`` is the
VeloxSeg authors' training (github.com/JinPLu/VeloxSeg: ``config/train_config_bs4.json``, ``utils/loss.py``,
``utils/train_autopet.py``); docs/veloxseg.md lists what is not matched.
"""

from __future__ import annotations

from typing import Any

# What the authors' BTCV and BraTS runs share: optimizer, schedule floor, loss, orientation (configs/*.yaml).
_STP_MTA_SHARED: dict[str, Any] = {
    "base_lr": 1.72e-2,  # README --lr=1.72e-2, scaled by batch_size / 256 in BaseTrainer.init_lr (paper: "1.3e-4")
    "min_lr_ratio": 0.0,  # adjust_learning_rate: cosine from the peak to 0
    "weight_decay": 0.05,  # yaml weight_decay
    "layer_decay": 0.75,  # yaml layer_decay
    "betas": [0.9, 0.95],  # yaml beta1, beta2
    "squared_pred": True,  # SegTrainer.build_model: DiceCELoss / DiceLoss(squared_pred=True, ...)
    "smooth_nr": 0.0,  # yaml smooth_nr
    "smooth_dr": 1e-6,  # yaml smooth_dr
    "orientation": "RAS",  # med_transforms: Orientationd(axcodes="RAS") for both datasets
}

RECIPES: dict[str, dict[str, Any]] = {
    # BTCV: configs/adaseg3d_btcv.yaml with the README's BTCV command line (unetr_btcv.yaml agrees where they overlap).
    "btcv": {
        **_STP_MTA_SHARED,
        "preset": "btcv",  # 96^3 (yaml roi_x/y/z), patch 8, decoder v2, r = 0.9 (README --dec_arch, --tp_ratio)
        "model_args": {"drop_path_rate": 0.1},  # README --drop_path=0.1 (unetr_btcv.yaml drop_path: 0.1)
        "batch_size": 2,  # README --batch_size=2
        "num_samples": 4,  # yaml num_samples: 4 crops per volume, so 8 crops per step
        "epochs": 5000,  # README --epochs=5000 (one epoch = one pass over the 18 training volumes)
        "warmup_fraction": 50 / 5000,  # README --warmup_epochs=50 of 5000
        "val_every": 100,  # README --eval_freq=100
        "intensity": "ct",
        "ct_window": [-958.0, 326.0, -1.0, 1.0],  # README --a_min=-958 --a_max=326 --b_min=-1 --b_max=1
        "target_spacing": [1.5, 1.5, 2.0],  # yaml space_x, space_y, space_z
        "crop_foreground": True,  # med_transforms: CropForegroundd(source_key="image") in training and validation
    },
    # BraTS: configs/adaseg3d_msdbrats.yaml with the README's MSD BraTS command line.
    "brats": {
        **_STP_MTA_SHARED,
        "preset": "brats",  # 128^3, 4 channels, sigmoid TC/WT/ET, patch 8, decoder v1 (paper), r = 0.75
        "model_args": {"drop_path_rate": 0.0},  # adaseg3d_msdbrats.yaml drop_path: 0. (unetr_msdbrats.yaml: 0.1)
        "batch_size": 1,  # README --batch_size=1
        "num_samples": 3,  # README --num_samples=3
        "epochs": 533,  # README --epochs=533
        "warmup_fraction": 13 / 533,  # README --warmup_epochs=13 of 533
        "val_every": 1,  # README --eval_freq=1
        "intensity": "mri",  # NormalizeIntensityd(nonzero=True, channel_wise=True)
        "target_spacing": [1.0, 1.0, 1.0],  # med_transforms: Spacingd(pixdim=(1.0, 1.0, 1.0))
        "crop_foreground": False,  # med_transforms: CropForegroundd commented out of the training transforms
        "cache_rate": 0.5,  # README --cache_rate=0.5
    },
    # VeloxSeg: config/train_config_bs4.json (optimizer, schedulers, batch, epochs, crops) and the model config's
    # 96^3 patch size; a recipe of any dataset (spacing and intensity stay the dataset's).
    "veloxseg": {
        "model": "veloxseg",
        "lr": 2.5e-4,  # optimizer_args lr, not scaled by the batch
        "weight_decay": 0.01,  # optimizer_args weight_decay (torch.optim.AdamW, default betas)
        "betas": [0.9, 0.999],
        "layer_decay": 1.0,
        "batch_size": 2,  # batch_size
        "num_samples": 2,  # RandCropByPosNegLabeld(num_samples=2, pos=1, neg=1): 4 crops per step
        "roi_size": [96, 96, 96],  # patch_size of AutoPETII and BraTS2021
        "epochs": 300,  # epochs
        "warmup_fraction": 10 / 300,  # warmup_scheduler warmup_epochs: 10
        "min_lr_ratio": 6e-6 / 2.5e-4,  # cosine_annealing over the other 290 epochs to min_lr 6e-6
        "squared_pred": False,  # utils/loss.py: monai DiceLoss with its default smoothing, plus cross-entropy
        "smooth_nr": 1e-5,
        "smooth_dr": 1e-5,
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    """A copy of the values of recipe ``name`` (``model_args`` copied too); ValueError naming the valid recipes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    values = dict(RECIPES[name])
    values["model_args"] = dict(values.get("model_args") or {})
    return values
