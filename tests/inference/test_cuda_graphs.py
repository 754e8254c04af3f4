"""GraphedForward: CPU inputs run the model itself; on a GPU the replayed graph gives the eager outputs for every
new input, one graph per input shape (the CUDA tests are skipped where no GPU is present)."""

import nibabel as nib
import pytest
import torch

from conftest import save, synthetic_case, tiny_checkpoint
from sparseseg.benchmark.run import benchmark
from sparseseg.errors import InputError
from sparseseg.inference.cuda_graphs import GraphedForward
from sparseseg.inference.predictor import predict
from sparseseg.models.common.registry import create_model

TINY_SPARSE = {"img_size": 32, "hidden_size": 48, "mlp_dim": 96, "num_layers": 4, "num_heads": 3, "feature_size": 8,
               "prune_after": [1, 2, 3], "completion_size": 48, "completion_heads": 3,
               "in_channels": 1, "out_channels": 3, "prune_ratio": 0.5}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sparse_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("stp_mta_unetr", None, **TINY_SPARSE).to(device).eval()


def test_cpu_input_runs_the_model():
    model = _sparse_model("cpu")
    x = torch.randn(1, 1, 32, 32, 32)
    graphed = GraphedForward(model)
    with torch.inference_mode():
        torch.testing.assert_close(graphed(x), model(x))
    assert graphed.num_graphs == 0


def test_benchmark_cuda_graphs_need_cuda():
    with pytest.raises(InputError, match="CUDA graphs"):
        benchmark(["tiny_seg"], baseline="tiny_seg", device="cpu", cuda_graphs=True, memory=False)


@cuda
def test_replay_matches_eager_for_new_inputs_and_shapes():
    model = _sparse_model("cuda")
    graphed = GraphedForward(model)
    encode = GraphedForward(model.forward_encoder)
    with torch.inference_mode():
        for batch in (1, 1, 2):
            x = torch.randn(batch, 1, 32, 32, 32, device="cuda")
            torch.testing.assert_close(graphed(x), model(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(encode(x).final, model.forward_encoder(x).final, rtol=1e-4, atol=1e-4)
    assert graphed.num_graphs == 2  # batch 1 and batch 2


@cuda
def test_outputs_are_overwritten_unless_cloned():
    model = _sparse_model("cuda")
    shared, cloned = GraphedForward(model), GraphedForward(model, clone_outputs=True)
    a, b = (torch.randn(1, 1, 32, 32, 32, device="cuda") for _ in range(2))
    with torch.inference_mode():
        first_shared, first_cloned = shared(a), cloned(a)
        expected = model(a)
        shared(b), cloned(b)
    assert not torch.allclose(first_shared, expected, atol=1e-4)  # the graph's own buffer now holds b's result
    torch.testing.assert_close(first_cloned, expected, rtol=1e-4, atol=1e-4)


@cuda
def test_refuses_autograd():
    graphed = GraphedForward(_sparse_model("cuda"))
    with pytest.raises(RuntimeError, match="inference"):
        graphed(torch.randn(1, 1, 32, 32, 32, device="cuda"))


@cuda
def test_benchmark_with_cuda_graphs_and_amp():
    records = benchmark(["stp_mta_unetr"], prune_ratios=[0.5], device="cuda", warmup=1, repeats=2, amp=True,
                        cuda_graphs=True, model_args={"unetr:skip_layers": [1, 2, 3],
                                                    **{k: v for k, v in TINY_SPARSE.items() if k != "prune_ratio"}})
    for rec in records:
        assert rec["cuda_graphs"] and rec["amp"] and rec["throughput"] > 0 and rec["encoder_throughput"] > 0
        assert rec["peak_memory_mb"] > 0


@cuda
def test_predict_with_cuda_graphs_writes_the_eager_labels(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    image, _ = synthetic_case((20, 18, 22))  # windows of 8^3: several window batches, the last one smaller
    case = save(image, tmp_path / "in" / "case.nii.gz")
    eager = predict(ckpt, case, tmp_path / "eager", device="cuda", sw_batch_size=3)
    graphed = predict(ckpt, case, tmp_path / "graphed", device="cuda", sw_batch_size=3, cuda_graphs=True)
    assert (nib.load(eager[0]).get_fdata() == nib.load(graphed[0]).get_fdata()).all()
