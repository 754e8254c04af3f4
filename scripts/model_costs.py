"""Parameters and G MACs of ``unetr`` and ``stp_mta_unetr`` at the paper presets (docs/models.md), optionally with one
CPU forward pass of the BraTS-preset models.

    python scripts/model_costs.py            # counts only (meta device, a few seconds)
    python scripts/model_costs.py --time     # + one batch-1 CPU forward of each brats model, same process

MACs: ``sparseseg.count_macs`` (torch.utils.flop_counter: matmul, convolution and attention; norms not counted).
Timings are single runs on whatever else the machine is doing: a first look, not a benchmark.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparseseg import count_macs, count_params, create_model
from sparseseg.models.common.vit import Attention


def paper_convention_extra(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """G operations the paper's counter adds to ours (found by reconciling Tables 2/3, see docs/models.md):
    transposed convolutions counted per *output* voxel (8x for kernel 2, stride 2), one operation per attention
    weight (heads x L^2) and one per LayerNorm element."""
    extra = [0]

    def tconv(mod, inp, out):
        extra[0] += mod.weight[0].numel() * mod.weight.shape[0] * (out[0, 0].numel() - inp[0][0, 0].numel())

    def attn(mod, inp, out):
        extra[0] += mod.num_heads * inp[0].shape[1] ** 2 * inp[0].shape[0]

    def norm(mod, inp, out):
        extra[0] += out.numel()

    kinds = {torch.nn.ConvTranspose3d: tconv, Attention: attn, torch.nn.LayerNorm: norm}
    handles = [m.register_forward_hook(h) for m in model.modules() for k, h in kinds.items() if isinstance(m, k)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape, device="meta"))
    for h in handles:
        h.remove()
    return extra[0] / 1e9


def _shape(model: torch.nn.Module) -> tuple[int, ...]:
    args = model.model_args
    return (1, args["in_channels"], *(args["img_size"],) * 3)


def counts() -> None:
    rows = [("btcv", "unetr", None), ("btcv", "stp_mta_unetr", 0.9), ("brats", "unetr", None)]
    rows += [("brats", "stp_mta_unetr", r) for r in (0.25, 0.5, 0.75, 0.9)]
    print("| preset | model | r | tokens kept per stage | params (M) | G MACs | + paper's extra ops |")
    print("|---|---|---|---|---|---|---|")
    for preset, name, r in rows:
        with torch.device("meta"):
            model = create_model(name, preset=preset, **({} if r is None else {"prune_ratio": r}))
        kept = "-" if r is None else "/".join(str(k) for k in model.num_kept())
        macs = count_macs(model, _shape(model))
        print(f"| {preset} | {name} | {'-' if r is None else r} | {kept} | {count_params(model) / 1e6:.2f} | "
              f"{macs:.2f} | {macs + paper_convention_extra(model, _shape(model)):.2f} |")


def timings() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 128, 128, 128)
    print(f"torch threads: {torch.get_num_threads()}")
    for name in ("unetr", "stp_mta_unetr"):
        model = create_model(name, preset="brats").eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.forward_encoder(x)
            t1 = time.perf_counter()
            model(x)
            t2 = time.perf_counter()
        print(f"{name}: encoder {t1 - t0:.2f} s, end-to-end {t2 - t1:.2f} s (one run each)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time one CPU forward of each brats model")
    if parser.parse_args().time:
        timings()
    counts()
