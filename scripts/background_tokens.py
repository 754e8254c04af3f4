"""Per-window latency and G MACs of ``stp_mta_unetr`` with and without background token dropping, beside the dense
``unetr``, on windows whose patches are partly all background (docs/models.md, "Background tokens").

    python scripts/background_tokens.py --threads 2 --repeats 3            # brats, r = 0.75, 128^3
    python scripts/background_tokens.py --preset btcv --fractions 0.5      # CT: background at the window's b_min

Each window is seeded N(0, 1) (a z-scored scan) with the first rows of patches along the first axis set to the
background value (0 for brats, -1 for btcv), so that ``fraction`` of the patch tokens are all background. All runs
are interleaved in this process, round after round (batch 1, ``torch.inference_mode``, each model through
``optimize_for_cpu_inference`` as ``predict`` runs it; per run one ``forward_encoder`` call, then one whole forward
pass); the table gives the medians of the rounds, the whole pass's rounds listed. MACs:
``count_macs`` on the meta device for the models that do not drop, on the real window for those that do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparseseg import count_macs, create_model
from sparseseg.inference.fast_cpu import optimize_for_cpu_inference
from sparseseg.models.stp_mta.background import foreground_patches

BACKGROUND = {"brats": 0.0, "btcv": -1.0}  # MRI zeros after NormalizeIntensity(nonzero=True); CT air at b_min


def window(shape: tuple[int, ...], patch: int, fraction: float, background: float) -> torch.Tensor:
    """``[1, C, D, H, W]`` N(0, 1) with the first ``round(fraction * rows)`` rows of patches set to ``background``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rows = round(fraction * shape[2] / patch)
    x[:, :, : rows * patch] = background
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="brats", choices=sorted(BACKGROUND))
    parser.add_argument("--prune-ratio", type=float, default=None, help="default: the preset's")
    parser.add_argument("--fractions", default="0.5,0.8", help="shares of all-background patch tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one untimed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = create_model("unetr", preset=args.preset).eval()
    ratio = {} if args.prune_ratio is None else {"prune_ratio": args.prune_ratio}
    sparse = create_model("stp_mta_unetr", preset=args.preset, **ratio).eval()
    dropping = create_model("stp_mta_unetr", preset=args.preset, drop_background=True,
                            background_value=BACKGROUND[args.preset], **ratio).eval()
    dropping.load_state_dict(sparse.state_dict())
    size, channels, patch = sparse.model_args["img_size"], sparse.model_args["in_channels"], sparse.patch_size
    shape = (1, channels, *(size,) * 3)
    runs = [("unetr", dense, window(shape, patch, 0.0, BACKGROUND[args.preset]))]
    for f in (float(v) for v in args.fractions.split(",")):
        x = window(shape, patch, f, BACKGROUND[args.preset])
        runs += [(f"stp_mta_unetr, {f:.0%} background, drop off", sparse, x),
                 (f"stp_mta_unetr, {f:.0%} background, drop on", dropping, x)]
    fast = {id(m): optimize_for_cpu_inference(m) for m in (dense, sparse, dropping)}
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    encoder: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    with torch.inference_mode():
        for rnd in range(args.repeats + 1):
            for name, model, x in runs:
                t0 = time.perf_counter()
                fast[id(model)].forward_encoder(x)
                t1 = time.perf_counter()
                fast[id(model)](x)
                if rnd:
                    encoder[name].append(t1 - t0)
                    times[name].append(time.perf_counter() - t1)
    print(f"preset {args.preset}, r = {sparse.prune_ratio}, {size}^3, batch 1, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds")
    print("| model | background tokens | tokens into block 1 / after each stage | G MACs | encoder (s) | s per window "
          "| rounds (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, model, x in runs:
        background = int((~foreground_patches(x, patch, BACKGROUND[args.preset])).sum())
        n = sparse.vit.num_tokens
        if model is dense:
            tokens, macs = f"{n} (all blocks)", count_macs(model, shape)
        else:
            alive = n - background if model is dropping else n
            tokens = "/".join(str(k) for k in [alive, *model.num_kept(max(alive, 1))])
            macs = count_macs(model, x, device="cpu") if model is dropping else count_macs(model, shape)
        rounds = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {background}/{n} | {tokens} | {macs:.1f} | {statistics.median(encoder[name]):.2f} | "
              f"{statistics.median(times[name]):.2f} | {rounds} |")


if __name__ == "__main__":
    main()
