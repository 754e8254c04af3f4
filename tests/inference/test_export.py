"""`sparseseg export`: ONNX (TopK / GatherElements for the sparse model) and TorchScript give PyTorch's output, for
every model at the demo's size, at batch 1 and 2; a model that cannot be exported is one line."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import LIBRARY_MODELS
from sparseseg.checkpoint import save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig
from sparseseg.demo.run import demo_settings
from sparseseg.inference.export import load_for_export
from sparseseg.models.common.registry import create_model, list_models

VIT = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "feature_size": 4, "patch_size": 8,
       "decoder": "v1", "img_size": [16, 16, 16], "in_channels": 1, "out_channels": 3}
MODELS = {"tiny_seg": {"in_channels": 1, "out_channels": 3, "feature_size": 4},
          "unetr": {**VIT, "skip_layers": [1, 2]},
          "stp_mta_unetr": {**VIT, "prune_after": [1], "completion_size": 48, "completion_heads": 2,
                            "prune_ratio": 0.5, "refine_block": 4},
          "dynunet": {"in_channels": 1, "out_channels": 3, "img_size": 16, "base_features": 8}}


def _checkpoint(tmp_path, name: str):
    if name not in list_models():
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    model = create_model(name, **MODELS[name])
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[16, 16, 16])
    return save_checkpoint(tmp_path / f"{name}.pt", model, data.to_dict())


def _reference(ckpt, x: torch.Tensor, prune_ratio: float | None = None,
               refine_fraction: float | None = None) -> np.ndarray:
    graph, _ = load_for_export(ckpt, prune_ratio, refine_fraction)
    with torch.no_grad():
        return graph(x).numpy()


@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr", "dynunet"])
def test_onnx_matches_pytorch(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name)
    out = tmp_path / f"{name}.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    if name == "stp_mta_unetr":
        assert {"TopK", "GatherElements"} <= ops  # the token selection is in the graph, not precomputed
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))  # batch 2: the axis is dynamic
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(logits, _reference(ckpt, x), atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    if name == "stp_mta_unetr":  # a test-time ratio is baked into the graph (K of the TopK)
        ratio = tmp_path / "r25.onnx"
        assert main(["export", "--checkpoint", str(ckpt), "--output", str(ratio), "--prune-ratio", "0.25"]) == 0
        (logits,) = ort.InferenceSession(str(ratio), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
        np.testing.assert_allclose(logits, _reference(ckpt, x, 0.25), atol=1e-4, rtol=1e-4)
        assert not np.allclose(logits, _reference(ckpt, x), atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_seg", "stp_mta_unetr"])
def test_torchscript_matches_pytorch(tmp_path, name):
    ckpt = _checkpoint(tmp_path, name)
    out = tmp_path / f"{name}.ts.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = torch.jit.load(str(out))(x).numpy()
    np.testing.assert_allclose(logits, _reference(ckpt, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_sparse_decoding_exports(tmp_path, fmt):
    """A refine fraction below 1 exports its block selection (TopK), gathers and scatter of refined blocks; the
    graph gives PyTorch's sparse-decoded logits for a batch other than the exported one."""
    ckpt = _checkpoint(tmp_path, "stp_mta_unetr")
    out = tmp_path / ("sparse.onnx" if fmt == "onnx" else "sparse.ts.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out),
                 "--refine-fraction", "0.5"]) == 0
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    want = _reference(ckpt, x, refine_fraction=0.5)
    assert not np.allclose(want, _reference(ckpt, x), atol=1e-3)  # half of the blocks come from the coarse fill
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"TopK", "Gather", "ConvTranspose"} <= ops and ops & {"ScatterND", "ScatterElements"}
        (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    else:
        with torch.no_grad():
            got = torch.jit.load(str(out))(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_refuses_bad_checkpoint_and_output(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(bad), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "bad.pt: not a sparseseg checkpoint" in capsys.readouterr().err
    ckpt = _checkpoint(tmp_path, "tiny_seg")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(blocker / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """``demo_model(name)``: an untrained checkpoint of ``name`` as ``sparseseg demo`` builds it (ICBM152 at 2 mm:
    1 channel, 4 classes, 48^3 windows; UNETR dim 192 x 6 blocks, patch 8), an input of batch 2 and PyTorch's
    logits for it; made once per model for both formats."""
    made = {}

    def make(name: str):
        if name not in made:
            settings = demo_settings(False, None, 0.75, 0, "cpu")
            known = (*settings.models, *settings.other_args)
            own = settings.args_of(name) if name in known else {}  # dynunet: its own plan for 48^3
            args = {**own, "in_channels": 1, "out_channels": 4, "img_size": 48}
            torch.manual_seed(0)
            data = DataConfig(in_channels=1, label_values=[0, 1, 2, 3], class_names=["bg", "csf", "gm", "wm"],
                              roi_size=[48, 48, 48])
            ckpt = save_checkpoint(tmp_path_factory.mktemp(name) / "demo.pt", create_model(name, **args),
                                   data.to_dict())
            x = torch.randn(2, 1, 48, 48, 48, generator=torch.Generator().manual_seed(2))  # the batch axis is free
            made[name] = ckpt, x, _reference(ckpt, x)
        return made[name]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", LIBRARY_MODELS)
def test_every_model_exports_at_the_demo_size(tmp_path, demo_model, name, fmt):
    ckpt, x, expected = demo_model(name)
    out = tmp_path / f"{name}.{fmt}"
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]) == 0
    if fmt == "onnx":
        (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    else:
        with torch.no_grad():
            logits = torch.jit.load(str(out))(x).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_failed_export_is_one_line(tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(tmp_path, "tiny_seg")

    def fails(*args, **kwargs):
        raise AssertionError("batch_size and channel_size must be non-None\n  a long exporter trace")

    monkeypatch.setattr(torch.onnx, "export", fails)
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "cannot export model 'tiny_seg' as onnx: AssertionError: batch_size" in err
    assert not out.exists() and not list(tmp_path.glob(".*"))
