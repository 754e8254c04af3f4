"""Training recipes: their values, the precedence defaults < recipe < config file < flags, and runs that carry them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from conftest import write_msd_dataset
from sparseseg.checkpoint import load_checkpoint
from sparseseg.cli import main
from sparseseg.config import TrainConfig, build_config
from sparseseg.data.datasets import load_dataset
from sparseseg.errors import InputError
from sparseseg.models.common.registry import resolve_model_args
from sparseseg.recipes import RECIPES
from sparseseg.training import trainer as trainer_mod
from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.setup import build_data_config

REQUIRED = {"dataset": "d.json", "model": "stp_mta_unetr", "output": "run"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config(name):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RECIPES[name]) <= fields - {"recipe"}
    cfg = TrainConfig.from_recipe(name, **REQUIRED).validate()
    assert cfg.recipe == name
    for model in ("unetr", "stp_mta_unetr"):  # the models these recipes are written for take their arguments
        resolve_model_args(model, cfg.preset, **cfg.model_args)


def test_btcv_and_brats_are_the_authors_runs():
    btcv = TrainConfig.from_recipe("btcv", **REQUIRED)
    assert btcv.batch_size * btcv.num_samples == 8  # 4 crops of each of 2 volumes per step
    assert btcv.learning_rate() == pytest.approx(1.72e-2 * 2 / 256)  # scaled by the volumes, not the crops
    assert btcv.model_args == {"drop_path_rate": 0.1} and btcv.warmup_fraction == pytest.approx(0.01)
    assert (btcv.target_spacing, btcv.orientation, btcv.crop_foreground) == ([1.5, 1.5, 2.0], "RAS", True)
    assert (btcv.squared_pred, btcv.smooth_nr, btcv.smooth_dr) == (True, 0.0, 1e-6)
    assert btcv.ct_window == [-958.0, 326.0, -1.0, 1.0] and btcv.preset == "btcv"
    brats = TrainConfig.from_recipe("brats", **REQUIRED)
    assert (brats.batch_size, brats.num_samples, brats.epochs) == (1, 3, 533)
    assert brats.warmup_fraction == pytest.approx(13 / 533) and brats.intensity == "mri"
    assert resolve_model_args("stp_mta_unetr", brats.preset)["decoder"] == "v1"


def test_precedence_defaults_recipe_file_flags(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("recipe: brats\ndataset: d.json\nmodel: unetr\noutput: run\nbatch_size: 3\n"
                        "target_spacing: null\nmodel_args: {hidden_size: 96}\n")
    cfg = build_config({"num_samples": 2}, cfg_file, ["drop_path_rate=0.2"])
    assert cfg.recipe == "brats" and cfg.epochs == 533  # recipe over the default
    assert cfg.batch_size == 3 and cfg.target_spacing is None  # the file over the recipe
    assert cfg.num_samples == 2 and cfg.model_args == {"drop_path_rate": 0.2, "hidden_size": 96}  # flags on top
    assert cfg.lr is None and cfg.amp is True  # untouched defaults
    other = build_config({"recipe": "btcv"}, cfg_file)  # --recipe beats the file's key
    assert other.recipe == "btcv" and other.num_samples == 4 and other.batch_size == 3
    with pytest.raises(InputError, match=r"cfg.yaml: unknown recipe 'nnunet'; valid recipes: brats, btcv"):
        cfg_file.write_text("recipe: nnunet\ndataset: d\nmodel: m\noutput: o\n")
        build_config({}, cfg_file)


def test_recipe_is_only_set_by_applying_it():
    with pytest.raises(TypeError, match="recipe"):
        TrainConfig(recipe="btcv", **REQUIRED)  # a recipe name without its values cannot be built
    plain = TrainConfig(**REQUIRED)
    assert plain.recipe is None and plain.num_samples == 1 and plain.squared_pred is False
    with pytest.raises(InputError, match="num_samples must be >= 1"):
        TrainConfig(num_samples=0, **REQUIRED).validate()


def test_loss_options_reach_monai():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    theirs = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    ours = SegmentationLoss(squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    assert ours(logits, target)[0] == pytest.approx(float(theirs(logits, target)))
    assert ours(logits, target)[0] != pytest.approx(float(SegmentationLoss()(logits, target)[0]))
    regions = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    sig = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    assert SegmentationLoss(True, True, 0.0, 1e-6)(logits, regions)[0] == pytest.approx(float(sig(logits, regions)))


def test_num_samples_crops_per_volume_in_each_step(tmp_path, msd_dataset):
    cfg = TrainConfig(dataset=str(msd_dataset), model="tiny_seg", output=str(tmp_path / "run"), roi_size=[16] * 3,
                      batch_size=2, num_samples=3, model_args={"feature_size": 4})
    ds = load_dataset(cfg.dataset)
    train_ds, _ = trainer_mod._loaders(cfg, build_data_config(cfg, ds), ds.training[:2], [])
    batch = next(iter(trainer_mod._epoch_loader(train_ds, cfg, iters=1, epoch=1)))
    assert batch["image"].shape == (6, 1, 16, 16, 16) and batch["label"].shape == (6, 1, 16, 16, 16)


def test_resume_refuses_a_config_that_changes_the_run():
    stored = TrainConfig.from_recipe("btcv", **REQUIRED).to_dict()
    same = TrainConfig.from_recipe("btcv", **{**REQUIRED, "epochs": 9000, "device": "cpu", "resume": True})
    assert same.changed_settings(stored) == []  # the length, the device and resume itself may change
    changed = TrainConfig(**REQUIRED).changed_settings(stored)  # the same run without its recipe
    assert "recipe: 'btcv' -> None" in changed and "num_samples: 4 -> 1" in changed
    assert TrainConfig(**REQUIRED, betas=(0.9, 0.95)).changed_settings(TrainConfig(**REQUIRED).to_dict()) == []
    older = {k: v for k, v in TrainConfig(**REQUIRED).to_dict().items()
             if k not in ("recipe", "num_samples", "squared_pred", "smooth_nr", "smooth_dr")}
    assert TrainConfig(**REQUIRED).changed_settings(older) == []  # fields a checkpoint lacks count as defaults


VIT = ["hidden_size=12", "mlp_dim=24", "num_layers=2", "num_heads=2", "feature_size=4", "decoder=v1"]


@pytest.mark.slow
def test_train_with_a_recipe_stores_it_and_resumes_only_the_same_run(tmp_path, capsys):
    dataset = write_msd_dataset(tmp_path / "Task00", num_cases=3, shape=(24, 24, 24), num_test=0)
    run = tmp_path / "run"

    def train(epochs: int, num_samples: int, *extra: str) -> int:
        argv = ["train", "--recipe", "btcv", "--dataset", str(dataset), "--model", "unetr", "--output", str(run),
                "--roi-size", "16", "--epochs", str(epochs), "--iters-per-epoch", "1", "--num-samples",
                str(num_samples), "--device", "cpu", *extra]
        for arg in VIT:
            argv += ["--model-arg", arg]
        return main(argv)

    assert train(1, 2) == 0
    ckpt = load_checkpoint(run / "last.pt")
    config, data = ckpt["config"], ckpt["data"]
    assert config["recipe"] == "btcv" and config["num_samples"] == 2 and config["squared_pred"] is True
    assert ckpt["model_args"]["drop_path_rate"] == 0.1 and ckpt["model_args"]["patch_size"] == 8
    assert (data["target_spacing"], data["orientation"], data["crop_foreground"]) == ([1.5, 1.5, 2.0], "RAS", True)
    assert train(2, 2, "--resume") == 0  # a longer run: resumes
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    capsys.readouterr()
    assert train(3, 3, "--resume") == 2  # other crops per step: another run, refused in one line
    err = capsys.readouterr().err.strip()
    assert "last.pt: cannot resume: the config changes num_samples: 2 -> 3" in err and len(err.splitlines()) == 1
