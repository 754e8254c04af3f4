from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparseseg.checkpoint as ckpt_mod
from conftest import write_nnunet_dataset
from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sparseseg.config import TrainConfig, build_config, parse_model_args
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import create_model
from sparseseg.training import run_state
from sparseseg.training import trainer as trainer_mod
from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.optim import WarmupCosine, build_optimizer, layer_ids, param_groups
from sparseseg.training.validation import validate


class TinyViT(nn.Module):
    """Parameter names of a ViT encoder (patch_embed, pos_embed, cls_token, blocks.i, norm) plus a head."""

    def __init__(self, depth: int = 3, dim: int = 8):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Conv3d(1, dim, 2, 2)
        self.encoder.pos_embed = nn.Parameter(torch.zeros(1, 9, dim))
        self.encoder.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.encoder.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)


def test_layer_decay_and_weight_decay_groups():
    model = TinyViT(depth=3)
    ids, num_layers = layer_ids(model)
    assert num_layers == 3
    assert ids["encoder.patch_embed.weight"] == ids["encoder.pos_embed"] == ids["encoder.cls_token"] == 0
    assert [ids[f"encoder.blocks.{b}.1.weight"] for b in range(3)] == [1, 2, 3]
    assert ids["head.weight"] == ids["encoder.norm.weight"] == 4
    scale = {id(p): g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in param_groups(model, 0.05, 0.5) for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.patch_embed.weight"])] == 0.5**4  # decay^(num_layers + 1)
    assert scale[id(named["encoder.blocks.0.1.weight"])] == 0.5**3  # block b: decay^(num_layers - b)
    assert scale[id(named["encoder.blocks.2.1.weight"])] == 0.5
    assert scale[id(named["head.weight"])] == 1.0
    assert decay[id(named["head.weight"])] == 0.05 and decay[id(named["encoder.blocks.0.1.weight"])] == 0.05
    for name in ("head.bias", "encoder.norm.weight", "encoder.blocks.1.0.weight", "encoder.pos_embed"):
        assert decay[id(named[name])] == 0.0
    opt = build_optimizer(model, lr=1e-3, layer_decay=0.5)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert {g["lr"] for g in opt.param_groups} == {1e-3 * 0.5**k for k in range(5)}


def test_no_decay_without_vit_and_layer_id_method():
    conv = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 2, 1))
    assert {g["lr_scale"] for g in param_groups(conv)} == {1.0}
    model = TinyViT(depth=2)
    model.num_layers = 2
    model.layer_id = lambda name: 3 if name.startswith("encoder") else 0  # the model's own word wins
    ids, n = layer_ids(model)
    assert n == 2 and ids["encoder.blocks.0.1.weight"] == 3 and ids["head.weight"] == 0


def test_warmup_cosine_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, base_lr=1.0, total_iters=100, warmup_fraction=0.1, min_lr_ratio=0.0)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(99):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 iterations
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] == pytest.approx(0.0)
    timed = WarmupCosine(opt, 1.0, total_iters=10**6, warmup_fraction=0.0, time_budget=10.0)
    timed.step(elapsed=5.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half the time spent: half-way down the cosine


def test_loss_parts():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 20
    loss = SegmentationLoss()
    good, _ = loss(perfect, target)
    bad, _ = loss(-perfect, target)
    assert good < 0.01 < bad
    low = torch.nn.functional.avg_pool3d(perfect, 2)
    total, parts = loss(SegmentationOutput(perfect, {"ratio": torch.tensor(0.25)}, [low]), target)
    assert parts["ratio"] == 0.25 and total == pytest.approx(parts["seg"] + 0.25)
    regions = SegmentationLoss(sigmoid=True)
    multi = (torch.rand(1, 3, 8, 8, 8) > 0.5).float()
    assert regions((multi * 2 - 1) * 20, multi)[0] < 0.01 < regions((1 - 2 * multi) * 20, multi)[0]


def test_deep_supervision_weights():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (1, 1, 8, 8, 8))
    good = torch.nn.functional.one_hot(target[:, 0], 2).permute(0, 4, 1, 2, 3).float() * 20
    loss = SegmentationLoss()
    seg_good, seg_bad = float(loss.seg(good, target.float())), float(loss.seg(-good, target.float()))
    # default 1, 1/2 normalised: the bad extra output counts 1/3; the model's equal weights: 1/2
    default = loss(SegmentationOutput(good, deep_supervision=[-good]), target)[1]["seg"]
    equal = loss(SegmentationOutput(good, deep_supervision=[-good], deep_supervision_weights=[1.0, 1.0]), target)
    assert default == pytest.approx((2 * seg_good + seg_bad) / 3, rel=1e-5)
    assert equal[1]["seg"] == pytest.approx((seg_good + seg_bad) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="weights"):
        loss(SegmentationOutput(good, deep_supervision=[-good], deep_supervision_weights=[1.0]), target)


def test_checkpoint_round_trip_and_rejects(tmp_path):
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4)
    path = save_checkpoint(tmp_path / "m.pt", model, {"in_channels": 1}, epoch=3, rng=ckpt_mod.rng_state())
    ckpt = load_checkpoint(path)
    assert ckpt["model_name"] == "tiny_seg" and ckpt["epoch"] == 3
    rebuilt = model_from_checkpoint(ckpt)
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(InputError, match="plain.pt: not a sparseseg checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(InputError, match="junk.pt: not a sparseseg checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "sparseseg-checkpoint", "obj": nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="pickled.pt: not a sparseseg checkpoint"):
        load_checkpoint(tmp_path / "pickled.pt")  # arbitrary objects are refused by weights_only


@pytest.mark.parametrize("decoder,old_taps", [("v2", (3, 6, 9)), ("v1", (4, 8))])
def test_format_1_unetr_checkpoint_keeps_the_taps_it_was_trained_with(tmp_path, decoder, old_taps):
    args = dict(in_channels=1, out_channels=2, img_size=32, decoder=decoder, hidden_size=12, mlp_dim=24,
                num_layers=12, num_heads=2, feature_size=4)
    model = create_model("unetr", **args)
    path = save_checkpoint(tmp_path / "new.pt", model, {})
    assert model_from_checkpoint(load_checkpoint(path)).skip_layers == model.skip_layers != old_taps
    old = torch.load(path, weights_only=True)
    old["format_version"] = 1  # written before the default taps changed, without skip_layers
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["model_args"]["skip_layers"] == list(old_taps)
    assert model_from_checkpoint(ckpt).skip_layers == old_taps



@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr"])
def test_format_2_checkpoint_without_the_fill_decodes_densely_only(tmp_path, name):
    """Weights saved before sparse decoding have no fill: they load, decode as before, and refuse refine < 1."""
    from sparseseg.inference.predictor import set_refine_fraction

    args = dict(in_channels=1, out_channels=2, img_size=32, hidden_size=12, mlp_dim=24, num_layers=3, num_heads=2,
                feature_size=4)
    if name == "stp_mta_unetr":
        args.update(prune_after=(1, 2), completion_size=12, completion_heads=2)
    torch.manual_seed(0)
    model = create_model(name, **args).eval()
    path = save_checkpoint(tmp_path / "new.pt", model, {})
    old = torch.load(path, weights_only=True)
    old["format_version"] = 2
    old["state_dict"] = {k: v for k, v in old["state_dict"].items() if not k.startswith("sparse_decoding.")}
    torch.save(old, tmp_path / "old.pt")
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "old.pt"), tmp_path / "old.pt").eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(InputError, match="old.pt: .*predate sparse decoding"):
        set_refine_fraction(rebuilt, 0.5, tmp_path / "old.pt")
    set_refine_fraction(model_from_checkpoint(load_checkpoint(path)), 0.5)  # a current checkpoint may

def test_config_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("dataset: d.json\nmodel: tiny_seg\noutput: run\nepochs: 7\nroi_size: 16\n"
                        "model_args: {feature_size: 4, in_channels: 1}\n")
    cfg = build_config({"epochs": 3, "lr": None}, cfg_file, ["feature_size=6", "img_size=[16, 16, 8]"])
    assert cfg.epochs == 3 and cfg.roi_size == [16, 16, 16] and cfg.lr is None
    assert cfg.model_args == {"feature_size": 6, "in_channels": 1, "img_size": [16, 16, 8]}
    assert TrainConfig(dataset="d", model="m", output="o").learning_rate() == pytest.approx(1.3e-4)
    with pytest.raises(InputError, match=r"cfg.yaml: unknown config key\(s\) \['epoch'\]"):
        cfg_file.write_text("epoch: 3\n")
        build_config({}, cfg_file)
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_model_args(["hidden_size"])
    with pytest.raises(InputError, match="prune_ratio"):
        build_config({"dataset": "d", "model": "m", "output": "o", "prune_ratio": 1.5})
    assert parse_model_args(["a=1", "b=true", "c=v1", "d=0.5"]) == {"a": 1, "b": True, "c": "v1", "d": 0.5}


def _cfg(dataset, output, **kw) -> TrainConfig:
    base = {"dataset": str(dataset), "model": "tiny_seg", "output": str(output), "roi_size": [16, 16, 16],
            "epochs": 2, "iters_per_epoch": 2, "batch_size": 2, "lr": 3e-3, "seed": 7,
            "model_args": {"feature_size": 4}}
    return TrainConfig(**{**base, **kw})


def test_resume_gives_the_same_weights(tmp_path, msd_dataset, monkeypatch):
    full = trainer_mod.train(_cfg(msd_dataset, tmp_path / "full"))
    assert full.name == "best.pt"

    real_save = run_state.save_checkpoint

    def interrupt_after_first_epoch(path, *args, **kwargs):
        out = real_save(path, *args, **kwargs)
        if path.name == "last.pt":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(run_state, "save_checkpoint", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(_cfg(msd_dataset, tmp_path / "split"))
    monkeypatch.setattr(run_state, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    trainer_mod.train(_cfg(msd_dataset, tmp_path / "split", resume=True))

    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["iteration"] == b["iteration"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    with open(tmp_path / "split" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) == pytest.approx(a["history"][1]["train_loss"], rel=1e-6)
    meta = json.loads((tmp_path / "full" / "config.json").read_text())
    assert meta["model_name"] == "tiny_seg" and meta["data"]["intensity"] == "ct"
    assert set(meta["train_cases"]).isdisjoint(meta["val_cases"])


def test_resume_restores_each_process_random_state(tmp_path, msd_dataset):
    cfg = _cfg(msd_dataset, tmp_path / "run")
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4)
    optimizer = build_optimizer(model, 1e-3)
    scheduler = WarmupCosine(optimizer, 1e-3, 10)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt_mod.rng_state())
    save_checkpoint(tmp_path / "last.pt", model, {}, epoch=1, best_metric=0.5, best_epoch=1, elapsed=1.0, history=[],
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    rng=states[0], rng_per_rank=states)
    for rank in (0, 1):
        torch.manual_seed(99)
        run_state.restore(tmp_path / "last.pt", model, optimizer, scheduler, scaler, cfg,
                          trainer_mod.DistInfo(rank=rank, world_size=2))
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])


def test_regions_training_on_multichannel_nnunet(tmp_path):
    ds = write_nnunet_dataset(tmp_path / "nn", num_cases=2, shape=(16, 16, 16), channels=2)
    meta = json.loads(ds.read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    ds.write_text(json.dumps(meta))
    best = trainer_mod.train(_cfg(ds, tmp_path / "run", epochs=1, batch_size=1))
    ckpt = load_checkpoint(best)
    assert ckpt["data"]["regions"] == [[1, 2], [2]] and ckpt["data"]["intensity"] == "mri"
    assert ckpt["model_args"]["in_channels"] == 2 and ckpt["model_args"]["out_channels"] == 2
    assert {"dice_whole", "dice_core", "mean_dice"} <= set(ckpt["history"][0])


def test_data_tells_the_model_sigmoid_or_softmax(tmp_path, msd_dataset):
    """Sparse decoding reads the fill's uncertainty as sigmoid regions or softmax classes: the data decides."""
    ds = write_nnunet_dataset(tmp_path / "nn", num_cases=2, shape=(16, 16, 16), channels=2)
    meta = json.loads(ds.read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    ds.write_text(json.dumps(meta))
    tiny = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4, "decoder": "v1",
            "skip_layers": [1, 2]}
    for dataset, sigmoid in ((ds, True), (msd_dataset, False)):
        cfg = _cfg(dataset, tmp_path / "run", model="unetr", model_args=tiny)
        data_cfg = trainer_mod.build_data_config(cfg, trainer_mod.load_dataset(cfg.dataset))
        assert trainer_mod.build_model(cfg, data_cfg).sparse_decoding.sigmoid is sigmoid


def test_conflicting_model_geometry(tmp_path, msd_dataset):
    with pytest.raises(InputError, match="in_channels=4 conflicts with the data"):
        trainer_mod.train(_cfg(msd_dataset, tmp_path / "run", model_args={"in_channels": 4}))
    with pytest.raises(InputError, match="has no prune_ratio argument"):
        trainer_mod.train(_cfg(msd_dataset, tmp_path / "run", prune_ratio=0.5))
    assert not (tmp_path / "run").exists()


def test_time_budget_stops_training(tmp_path, msd_dataset):
    best = trainer_mod.train(_cfg(msd_dataset, tmp_path / "run", epochs=50, time_budget=1e-3))
    ckpt = load_checkpoint(best)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 1  # stopped after the first step, then validated
    assert "mean_dice" in ckpt["history"][-1]
    assert ckpt["scheduler"]["time_budget"] == 1e-3


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # registers tiny_seg
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from sparseseg.config import TrainConfig
from sparseseg.training import train


def first_step(optimizer, args, kwargs):  # the DDP-averaged gradients and the weights before the first step
    if not getattr(first_step, "done", False):
        first_step.done = True
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.save({{"params": [p.detach().clone() for p in params], "grads": [p.grad.clone() for p in params]}},
                   {grads!r} + f"/rank{{dist.get_rank()}}.pt")


register_optimizer_step_pre_hook(first_step)
train(TrainConfig(**{config!r}))
"""


def _union_gradients(cfg: TrainConfig, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of one process on rank 0's and rank 1's first batches put together, from the same weights."""
    ds = trainer_mod.load_dataset(cfg.dataset)
    train_cases, val_cases = trainer_mod.split_cases(ds, cfg.fold, cfg.num_folds, cfg.seed)
    data_cfg = trainer_mod.build_data_config(cfg, ds)
    model = trainer_mod.build_model(cfg, data_cfg)
    optimizer = build_optimizer(model, 1e-3)  # only for its parameter order, the one the hook saw
    mine = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, saved in zip(mine, params, strict=True):
            p.copy_(saved)
    train_ds, _ = trainer_mod._loaders(cfg, data_cfg, train_cases, [])
    batches = [next(iter(trainer_mod._epoch_loader(train_ds, cfg, cfg.iters_per_epoch, 1, rank))) for rank in (0, 1)]
    x = torch.cat([b["image"].as_tensor() for b in batches])  # [1 + 1, C, D, H, W]
    y = torch.cat([b["label"].as_tensor() for b in batches])
    model.train()
    loss, _ = SegmentationLoss()(model(x, target=y.long()), y)
    loss.backward()
    return [p.grad for p in mine]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, msd_dataset):
    """2 Gloo processes: one checkpoint set, first-step gradients of the union batch, Dice of all validation cases."""
    config = {"dataset": str(msd_dataset), "model": "tiny_seg", "output": str(tmp_path / "run"),
              "roi_size": [16, 16, 16], "epochs": 2, "iters_per_epoch": 2, "batch_size": 1, "lr": 3e-3,
              "num_folds": 2, "model_args": {"feature_size": 4}, "time_budget": 600, "tensorboard": False}
    (tmp_path / "grads").mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), grads=str(tmp_path / "grads"),
                                        config=config))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "config.json", "last.pt", "log.csv"]
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 4 and len(ckpt["history"]) == 2
    assert len(ckpt["rng_per_rank"]) == 2 and not torch.equal(ckpt["rng_per_rank"][0]["torch"],
                                                               ckpt["rng_per_rank"][1]["torch"])
    assert ckpt["sampler"] == {"kind": "seeded-per-epoch", "seed": 0, "epoch": 2, "world_size": 2}
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["learning_rate"] == pytest.approx(6e-3) and len(meta["val_cases"]) == 2

    ranks = [torch.load(tmp_path / "grads" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    cfg = TrainConfig(**config)
    expected = _union_gradients(cfg, ranks[0]["params"])
    for g0, g1, ref in zip(ranks[0]["grads"], ranks[1]["grads"], expected, strict=True):
        assert torch.equal(g0, g1)  # DDP averaged them
        torch.testing.assert_close(g0, ref, rtol=1e-4, atol=1e-6)

    # The logged Dice covers both validation cases although each process scored only one of them.
    ds = trainer_mod.load_dataset(cfg.dataset)
    _, val_cases = trainer_mod.split_cases(ds, cfg.fold, cfg.num_folds, cfg.seed)
    data_cfg = DataConfig.from_dict(ckpt["data"])
    _, val_ds = trainer_mod._loaders(cfg, data_cfg, val_cases, val_cases)
    model = model_from_checkpoint(ckpt)
    full = validate(model, trainer_mod.DataLoader(val_ds, batch_size=1), data_cfg, torch.device("cpu"))
    assert ckpt["history"][-1]["mean_dice"] == pytest.approx(full["mean_dice"], abs=1e-6)
