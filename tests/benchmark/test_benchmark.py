from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
import torch.nn as nn

from sparseseg.benchmark.report import markdown_table
from sparseseg.benchmark.run import _model_overrides, _percentile, _unused_model_args, benchmark
from sparseseg.cli import main
from sparseseg.errors import InputError
from sparseseg.inference.fast_cpu import onednn_convolution_available
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import list_models, register_model
from sparseseg.models.common.tokens import gather_tokens, num_keep, scatter_tokens

RECORD_KEYS = {"model", "preset", "prune_ratio", "refine_fraction", "params", "gmacs", "encoder_throughput",
               "throughput", "latency_ms_median", "latency_ms_p90", "peak_memory_mb", "train_throughput", "speedup",
               "encoder_speedup", "train_speedup", "memory_ratio", "baseline", "device", "threads",
               "torch_version"}


class TinyTokenSeg(nn.Module):
    """Patch-4 embedding, one MLP "block" on the kept tokens (the top-K by norm when ``prune_ratio > 0``), the
    pruned tokens put back unchanged, a transposed-conv head back to the image size."""

    def __init__(self, *, in_channels: int = 1, out_channels: int = 2, img_size: int = 16, hidden_size: int = 32,
                 prune_ratio: float = 0.0):
        super().__init__()
        self.prune_ratio = prune_ratio
        self.embed = nn.Conv3d(in_channels, hidden_size, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(),
                                 nn.Linear(4 * hidden_size, hidden_size))
        self.head = nn.ConvTranspose3d(hidden_size, out_channels, 4, stride=4)

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, C, d, h, w] -> [B, N, C]
        k = num_keep(tokens.shape[1], self.prune_ratio)
        keep_idx = tokens.norm(dim=-1).topk(k, dim=1).indices.sort(dim=1).values  # [B, K]
        kept = gather_tokens(tokens, keep_idx)  # [B, K, C]
        return kept + self.mlp(kept), keep_idx

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        b, _, d, h, w = x.shape
        kept, keep_idx = self.forward_encoder(x)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
        tokens = scatter_tokens(tokens, keep_idx, kept)  # [B, N, C]
        grid = tokens.transpose(1, 2).reshape(b, -1, d // 4, h // 4, w // 4)  # [B, N, C] -> [B, C, d, h, w]
        logits = self.head(grid)  # [B, C, d, h, w] -> [B, out_channels, D, H, W]
        return SegmentationOutput(logits, {"tiny": 1e-3 * kept.pow(2).mean()}) if self.training else logits


for _name in ("bench_dense", "bench_sparse"):
    if _name not in list_models():
        register_model(_name, presets={"btcv": {"img_size": 16}})(TinyTokenSeg)


if "bench_dense_only" not in list_models():
    def bench_dense_only(  # the same network without a prune_ratio argument
*, in_channels: int = 1, out_channels: int = 2, img_size: int = 16, hidden_size: int = 32):
        return TinyTokenSeg(in_channels=in_channels, out_channels=out_channels, img_size=img_size,
                            hidden_size=hidden_size)

    register_model("bench_dense_only")(bench_dense_only)


def _check_record(rec: dict) -> None:
    assert RECORD_KEYS <= set(rec)
    for key in ("params", "gmacs", "throughput", "latency_ms_median", "latency_ms_p90", "speedup"):
        assert rec[key] > 0 and math.isfinite(rec[key]), key
    assert rec["latency_ms_p90"] >= rec["latency_ms_median"]
    assert rec["device"] == "cpu" and rec["threads"] == 1 and rec["torch_version"] == torch.__version__
    assert rec["cpu_allocator"] in ("glibc-keep", "system")
    assert rec["cpu_fast_path"] is onednn_convolution_available()  # each of these models has a dense 3-D conv


def test_records_train_and_ratios():
    records = benchmark(["bench_sparse"], prune_ratios=[0.5, 0.75], threads=1, warmup=1, repeats=2, train=True,
                        baseline="bench_dense_only", memory=False, model_args={"hidden_size": 32})
    assert [(r["model"], r["prune_ratio"]) for r in records] == [
        ("bench_dense_only", None), ("bench_sparse", 0.5), ("bench_sparse", 0.75)]
    for rec in records:
        _check_record(rec)
        assert rec["baseline"] == "bench_dense_only"
        assert rec["encoder_throughput"] > 0 and rec["train_throughput"] > 0
        assert rec["peak_memory_mb"] is None and rec["memory_ratio"] is None
    dense = records[0]
    assert dense["speedup"] == 1.0 and dense["encoder_speedup"] == 1.0 and dense["train_speedup"] == 1.0
    # pruning reduces the MACs of the token MLP (the head and embedding are the same)
    assert dense["gmacs"] > records[1]["gmacs"] > records[2]["gmacs"]
    assert records[1]["params"] == dense["params"]


def test_model_without_encoder_and_default_ratio_and_standard_modules():
    records = benchmark(["tiny_seg", "bench_sparse"], threads=1, warmup=0, repeats=1, baseline="tiny_seg",
                        memory=False, cpu_fast_path=False)
    plain, sparse = records
    assert plain["cpu_fast_path"] is sparse["cpu_fast_path"] is False
    assert "CPU fast path off" in markdown_table(records)
    _check_record({**plain, "cpu_fast_path": onednn_convolution_available()})
    assert plain["speedup"] == 1.0 and plain["prune_ratio"] is None
    assert plain["encoder_throughput"] is None and plain["encoder_speedup"] is None
    assert sparse["prune_ratio"] == 0.0  # the constructor default is reported
    assert sparse["encoder_speedup"] is None  # the baseline has no encoder to compare with


def test_cli_writes_json_markdown_plot(tmp_path, capsys):
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    code = main(["benchmark", "--preset", "btcv", "--models", "bench_sparse", "--baseline", "bench_dense",
                 "--prune-ratios", "0.75", "--model-arg", "hidden_size=32", "--threads", "1", "--warmup", "0",
                 "--repeats", "1", "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)])
    assert code == 0
    records = json.loads(out_json.read_text())
    assert [(r["model"], r["prune_ratio"]) for r in records] == [("bench_dense", 0.0), ("bench_sparse", 0.75)]
    for rec in records:
        _check_record(rec)
        assert rec["preset"] == "btcv"
        # peak RSS of a child process: the imports alone, then the weights, then the forward pass
        assert 0 < rec["memory_import_mb"] <= rec["memory_model_mb"] <= rec["peak_memory_mb"]
        assert rec["memory_import_mb"] < rec["peak_memory_mb"]  # the child's own peak, not one inherited at fork
    assert records[0]["speedup"] == 1.0 and records[0]["memory_ratio"] == 1.0
    # the baseline accepts prune_ratio too, but it is measured once, at its own default (0.0)
    table = out_md.read_text()
    assert table.count("| bench_sparse |") == 1 and "speedup" in table and "peak MB" in table
    assert table in capsys.readouterr().out
    image = matplotlib.image.imread(str(out_png))
    assert image.shape[:2] == (400, 1000)


def test_markdown_drops_empty_columns():
    rec = {"model": "m", "prune_ratio": None, "params": 2e6, "gmacs": 1.0, "encoder_throughput": None,
           "throughput": 2.0, "latency_ms_median": 500.0, "latency_ms_p90": 510.0, "peak_memory_mb": None,
           "train_throughput": None, "speedup": 1.0, "encoder_speedup": None, "train_speedup": None,
           "memory_ratio": None, "baseline": "m", "preset": None, "device": "cpu", "threads": 2,
           "torch_version": "x", "batch_size": 1, "warmup": 1, "repeats": 3, "macs_counter": "c"}
    table = markdown_table([rec])
    assert "| m | 2.00 | 1 | 2 | 500 / 510 | 1.00 |" in table
    assert "train" not in table.splitlines()[2]


def test_percentile():
    assert _percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert _percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert _percentile([5.0], 90) == 5.0


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ["no_such_model"]}, "unknown model"),
    ({"models": ["bench_sparse"], "prune_ratios": [1.0]}, "prune ratio"),
    ({"models": ["bench_sparse"], "model_args": {"depth_of_nothing": 3}}, "depth_of_nothing"),
    ({"models": ["bench_sparse"], "model_args": {"unetr:hidden_size": 32}}, "unetr:hidden_size"),
    ({"models": ["bench_sparse"], "repeats": 0}, "repeats"),
    ({"models": ["bench_sparse"], "device": "cuda:0"}, "cuda"),
    ({"models": ["bench_sparse"], "device": "cpu", "amp": True}, "CUDA only"),
])
def test_bad_requests(kwargs, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InputError, match=message):
        benchmark(baseline="bench_dense", threads=1, memory=False, **kwargs)


def test_cli_bad_ratio_exit_code(capsys):
    assert main(["benchmark", "--models", "bench_sparse", "--baseline", "bench_dense", "--prune-ratios", "x"]) == 2
    assert "--prune-ratios" in capsys.readouterr().err


def test_paper_models_tiny():
    """The registered UNETR and STP + MTA + UNETR (tiny overrides) through the benchmark: forward_encoder is timed,
    MACs fall with the prune ratio, the parameters do not depend on it."""
    tiny = {"img_size": 32, "hidden_size": 48, "mlp_dim": 96, "num_layers": 4, "num_heads": 3, "feature_size": 8,
            "skip_layers": [1, 2, 3], "prune_after": [1, 2, 3], "completion_size": 48, "completion_heads": 3}
    records = benchmark(["stp_mta_unetr"], prune_ratios=[0.5, 0.9], threads=1, warmup=0, repeats=1, train=True,
                        memory=False, model_args=tiny, profile=True)
    dense, half, most = records
    assert [r["model"] for r in records] == ["unetr", "stp_mta_unetr", "stp_mta_unetr"]
    assert dense["prune_ratio"] is None and dense["speedup"] == 1.0
    for rec in records:
        _check_record(rec)
        assert rec["encoder_throughput"] > 0 and rec["train_throughput"] > 0 and rec["encoder_speedup"] > 0
    assert half["gmacs"] > most["gmacs"] and half["params"] == most["params"]
    for rec in records:  # the profiled parts are found by module name and add up to the profiled pass
        prof = rec["profile_s"]
        assert prof["decoder"] > 0 and prof["encoder_blocks"] > 0 and min(prof.values()) >= 0
        assert sum(v for k, v in prof.items() if k != "total") == pytest.approx(prof["total"], rel=1e-6)
    assert dense["profile_s"]["scorers"] == 0 and most["profile_s"]["scorers"] > 0
    assert most["profile_s"]["completion"] > 0
    assert "Profile of one forward pass" in markdown_table(records)


def test_refine_fractions_one_record_each():
    """``refine_fractions``: one record per fraction of a model with sparse decoding (key ``refine_fraction``), the
    dense baseline once at its own default; MACs fall and the parameters stay."""
    tiny = {"img_size": 64, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4,
            "skip_layers": [1, 2, 2], "prune_after": [1], "completion_size": 48, "completion_heads": 2}
    records = benchmark(["stp_mta_unetr"], prune_ratios=[0.5], refine_fractions=[0.25, 1.0], threads=1, warmup=0,
                        repeats=1, memory=False, model_args=tiny)
    assert [(r["model"], r["prune_ratio"], r["refine_fraction"]) for r in records] == [
        ("unetr", None, 1.0), ("stp_mta_unetr", 0.5, 0.25), ("stp_mta_unetr", 0.5, 1.0)]
    dense, quarter, full = records
    assert quarter["gmacs"] < full["gmacs"] and quarter["params"] == full["params"] and dense["speedup"] == 1.0
    assert "| f |" in markdown_table(records)
    with pytest.raises(InputError, match="refine fraction"):
        benchmark(["stp_mta_unetr"], refine_fractions=[0.0], memory=False, model_args=tiny)
    assert main(["benchmark", "--models", "stp_mta_unetr", "--refine-fractions", "a,b"]) == 2


def test_per_model_overrides():
    args = {"hidden_size": 32, "num_heads": 2, "veloxseg:num_heads": [1, 2, 2], "unetr:num_heads": 4}
    assert _model_overrides("unetr", args) == {"hidden_size": 32, "num_heads": 4}
    assert _model_overrides("veloxseg", args)["num_heads"] == [1, 2, 2]
    assert "hidden_size" not in _model_overrides("veloxseg", args)
    assert _unused_model_args(["unetr", "veloxseg"], args) == []
    assert _unused_model_args(["unetr"], args) == ["veloxseg:num_heads"]
    assert _unused_model_args(["unetr"], {"unetr:no_such_arg": 1}) == ["unetr:no_such_arg"]
