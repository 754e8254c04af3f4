"""The ``sparseseg`` console script: parses arguments and calls the library. Nothing else lives here.

Each subcommand is one ``_add_<name>`` function that declares its flags and the library call it makes;
``main`` turns every :class:`SparsesegError` (bad input, bad checkpoint, bad flag) into a one-line message and a
non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sparseseg import __version__
from sparseseg.errors import SparsesegError
from sparseseg.runtime import plain_cublas_addmm, tune_cpu_allocator

log = logging.getLogger("sparseseg")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparseseg",
        description="Fast 3D medical image segmentation with sparse visual tokens.",
        epilog="On the CPU, commands keep freed tensor memory in the process (faster, higher resident size); "
               "SPARSESEG_MALLOC=system in the environment turns that off.",
    )
    parser.add_argument("--version", action="version", version=f"sparseseg {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug-level log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_models(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_visualize(sub)
    _add_demo(sub)
    _add_export(sub)
    return parser


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and their presets")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.models.common.registry import list_models, list_presets

        for name in list_models():
            sys.stdout.write(f"{name}  (presets: {', '.join(list_presets(name))})\n")
        return 0

    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from sparseseg.recipes import RECIPES

    p = sub.add_parser("train", help="train a model on an MSD / nnU-Net dataset",
                       description="Train a registered model. Flags override --config FILE (YAML), which overrides "
                                   "the --recipe, which overrides the defaults; see docs/pipeline.md.")
    S = argparse.SUPPRESS  # only flags that are given override the config file
    p.add_argument("--config", metavar="FILE", help="YAML file of training config keys")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=S,
                   help="named set of config values under the file and the flags: btcv, brats = the STP + MTA "
                        "authors' runs (for unetr and stp_mta_unetr)")
    p.add_argument("--dataset", default=S, help="dataset.json (MSD or nnU-Net v2) or its folder")
    p.add_argument("--model", default=S, help="registered model name (see `sparseseg models`)")
    p.add_argument("--output", default=S, help="run directory (config.json, log.csv, last.pt, best.pt)")
    p.add_argument("--preset", default=S, help="model preset: btcv or brats")
    p.add_argument("--roi-size", type=int, nargs="+", default=S, metavar="N", help="crop size: N or D H W")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--iters-per-epoch", type=int, default=S, help="default: one pass over the training cases")
    p.add_argument("--batch-size", type=int, default=S, help="volumes per step (the learning rate scales with it)")
    p.add_argument("--num-samples", type=int, default=S, help="random crops per volume per step (default 1)")
    p.add_argument("--lr", type=float, default=S, help="plain learning rate (default: base_lr * batch / 256)")
    p.add_argument("--prune-ratio", type=float, default=S, help="token pruning ratio of a sparse model")
    p.add_argument("--fold", type=int, default=S, help="validation fold of the seeded k-fold split")
    p.add_argument("--val-every", type=int, default=S, help="epochs between validations")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--intensity", choices=["ct", "mri", "none"], default=S,
                   help="intensity preset (default: ct for CT datasets, else mri)")
    p.add_argument("--target-spacing", type=float, nargs=3, default=S, metavar="MM", help="resample to this spacing")
    p.add_argument("--time-budget", type=float, default=S, metavar="SECONDS", help="stop training after this time")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model constructor argument (repeatable), e.g. hidden_size=192")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue from OUTPUT/last.pt (or the newest readable checkpoint there)")
    p.add_argument("--overwrite", action="store_true", default=S,
                   help="OUTPUT holds a run: move it to a dated sibling folder (OUTPUT.YYYYmmdd-HHMMSS) and start "
                        "afresh; nothing is deleted")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.config import build_config
        from sparseseg.training import train

        overrides = {k: v for k, v in vars(args).items() if k not in ("config", "model_arg", "func", "command",
                                                                       "verbose")}
        if "roi_size" in overrides:
            roi = overrides["roi_size"]
            if len(roi) not in (1, 3):
                from sparseseg.errors import SparsesegError

                raise SparsesegError("--roi-size takes 1 or 3 integers")
            overrides["roi_size"] = roi * 3 if len(roi) == 1 else roi
        config = build_config(overrides, args.config, args.model_arg)
        best = train(config)
        sys.stdout.write(f"{best}\n")
        return 0

    p.set_defaults(func=run)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment 3-D scans (NIfTI, NRRD, MetaImage, DICOM series) with a checkpoint",
                       description="Sliding-window inference; writes one label map per case on its input's grid, "
                                   "in the input's format by default: OUTPUT/CASE.nii.gz, CASE.seg.nrrd, CASE.mha "
                                   "(NIfTI for a DICOM series).")
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt of `sparseseg train`")
    p.add_argument("--input", required=True, nargs="+",
                   help="image file(s) (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd), DICOM series folder(s) (one series "
                        "each) and/or folders of them; CASE_0000, CASE_0001, ... are the channels of CASE")
    p.add_argument("--output", required=True, help="output folder (must not contain the inputs)")
    p.add_argument("--prune-ratio", type=float, default=None, help="test-time token pruning ratio")
    p.add_argument("--refine-fraction", type=float, default=None,
                   help="test-time share of the full-resolution blocks decoded (sparse decoding; 1 = dense)")
    p.add_argument("--drop-background-tokens", action="store_true",
                   help="token-pruning models: drop the patch tokens that are all background (MRI 0, CT the window's "
                        "low end) before the first block (faster, not exact; docs/models.md)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per forward pass (default: 1 on the CPU, 4 on a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--output-format", choices=["nifti", "nrrd", "mha", "dicom-seg"], default=None,
                   help="format of the label maps (default: the input's; NIfTI for a DICOM series): nifti "
                        "(CASE.nii.gz), nrrd (CASE.seg.nrrd, 3D Slicer segments), mha (CASE.mha), dicom-seg (CASE.dcm, "
                        "a DICOM SEG referencing the input series; needs sparseseg[dicom])")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE_probabilities.nii.gz ([X, Y, Z, K] float32; .nrrd / .mha in those formats)")
    p.add_argument("--stitch-device", default="auto",
                   help="where each whole volume is stitched (MONAI's device; --device is its sw_device): auto "
                        "(--device, or cpu for volumes too large for the GPU), cpu, cuda")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on a GPU, run the windows as replays of captured CUDA graphs (faster at small batches)")
    p.add_argument("--no-cpu-fast-path", action="store_true",
                   help="on the CPU, run the model's standard convolutions (see docs/benchmark.md)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave cases whose label map (and probabilities, with --save-probabilities) exist in OUTPUT "
                        "as they are: resumes a stopped run (outputs are written atomically, so an existing file is "
                        "complete); without it, existing outputs are replaced")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="predict only share I (from 0) of N, for N processes started by a shell loop or an array "
                        "job; under torchrun the shares come from RANK/WORLD_SIZE (see docs/pipeline.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: under torchrun on the CPU the cores divided by the "
                        "processes per machine, else torch's choice)")
    p.add_argument("--no-skip-background", action="store_true",
                   help="run the model on every window, also those whose input is all background (MRI zeros, CT "
                        "air); skipping them gives the same output (see docs/pipeline.md, Whole scans)")
    p.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                   help="crop each scan to its foreground (MRI: non-zero voxels; CT: > 0 after the window) before "
                        "the sliding window (default: as the checkpoint was trained); not exact: the windows move")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.inference.predictor import predict

        written = predict(args.checkpoint, args.input, args.output, prune_ratio=args.prune_ratio,
                          overlap=args.overlap, sw_batch_size=args.sw_batch_size, device=args.device,
                          save_probabilities=args.save_probabilities, stitch_device=args.stitch_device,
                          cuda_graphs=args.cuda_graphs, output_format=args.output_format,
                          cpu_fast_path=not args.no_cpu_fast_path, refine_fraction=args.refine_fraction,
                          skip_existing=args.skip_existing, shard=args.shard, threads=args.threads,
                          drop_background_tokens=args.drop_background_tokens,
                          skip_background=not args.no_skip_background, crop_foreground=args.crop_foreground)
        sys.stdout.write(f"wrote {len(written)} prediction(s) to {args.output}\n")
        return 0

    p.set_defaults(func=run)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice and HD95 of predictions against reference labels")
    p.add_argument("--pred", required=True, help="folder of predicted label maps (CASE.nii.gz, .seg.nrrd, .mha, ...)")
    p.add_argument("--label", required=True, help="folder of reference label maps (CASE.nii.gz, .nrrd, .mha, ...)")
    p.add_argument("--output", default=None, help="metrics.json to write")
    p.add_argument("--dataset", default=None, help="dataset.json for class names and regions (BraTS TC/WT/ET)")
    p.add_argument("--label-mode", choices=["auto", "classes", "regions"], default="auto",
                   help="auto: regions when the dataset defines them")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.evaluation.metrics import evaluate, format_table

        results = evaluate(args.pred, args.label, args.output, dataset=args.dataset, label_mode=args.label_mode)
        sys.stdout.write(format_table(results) + "\n")
        return 0

    p.set_defaults(func=run)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="speed, MACs and memory of models against their dense baseline",
                       description="Measure parameters, MACs, encoder and end-to-end throughput, latency, peak "
                                   "memory (and training throughput) of every model, one after the other in this "
                                   "process, against the dense baseline; with --case, time `predict` on whole scans "
                                   "instead (seconds per stage, windows, peak RSS; one fresh process per model and "
                                   "case); see docs/benchmark.md.")
    p.add_argument("--preset", default=None, help="paper geometry: btcv or brats (default: the models' own)")
    p.add_argument("--models", default="unetr,stp_mta_unetr", help="comma-separated model names")
    p.add_argument("--prune-ratios", default=None, metavar="R,R,...",
                   help="ratios for models with token pruning (default: each model's own)")
    p.add_argument("--refine-fractions", default=None, metavar="F,F,...",
                   help="sparse-decoding fractions for models that have it, at every ratio (default: each model's own)")
    p.add_argument("--baseline", default="unetr", help="dense model the speedups refer to ('none': no ratios)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default 3; with --case: rounds over the models, default 1)")
    p.add_argument("--train", action="store_true", help="also time training steps (forward + backward + step)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--amp", action="store_true",
                   help="float16 autocast (and a gradient scaler with --train), as sparseseg train on a GPU; "
                        "CUDA only")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time inference as replays of one captured CUDA graph per model (no per-kernel launch "
                        "cost); CUDA only")
    p.add_argument("--no-cpu-fast-path", action="store_true",
                   help="time the models' standard convolutions on the CPU, without the inference step "
                        "optimize_for_cpu_inference (applied to every model of the run by default)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one forward pass: seconds in encoder blocks, scorers, gather/scatter, "
                        "completion, decoder")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model constructor argument (repeatable), given to every model that accepts it; "
                        "MODEL:KEY=VALUE gives it to MODEL only")
    p.add_argument("--case", nargs="+", default=None, metavar="FILE",
                   help="whole-case benchmark of `predict` on these image files / DICOM series folders (CASE_0000, "
                        "CASE_0001, ... are the channels of CASE), with --checkpoint or untrained --models of --preset")
    p.add_argument("--checkpoint", nargs="+", default=None, metavar="FILE",
                   help="--case: checkpoints to compare, the baseline first (default: untrained --models of --preset)")
    p.add_argument("--overlap", type=float, default=0.5, help="--case: sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="--case: windows per forward pass (default: predict's, 1 on the CPU and 4 on a GPU)")
    p.add_argument("--no-skip-background", action="store_true",
                   help="--case: run every window, also the all-background ones (predict --no-skip-background)")
    p.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                   help="--case: crop each scan to its foreground first (predict --crop-foreground; default: as "
                        "each checkpoint was trained)")
    p.add_argument("--drop-background-tokens", action="store_true",
                   help="--case: the models that can drop all-background patch tokens do (predict "
                        "--drop-background-tokens)")
    p.add_argument("--prune-ratio", type=float, default=None,
                   help="--case: test-time pruning ratio of the models that prune tokens (default: each one's own)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the records as JSON")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the Markdown table")
    p.add_argument("--plot", default=None, metavar="FILE", help="write throughput and G MACs vs prune ratio (PNG)")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.benchmark.report import markdown_table, write_json, write_markdown, write_plot
        from sparseseg.benchmark.run import benchmark
        from sparseseg.config import parse_model_args

        if args.case:
            return _benchmark_cases(args)
        ratios = _numbers(args.prune_ratios, "--prune-ratios")
        fractions = _numbers(args.refine_fractions, "--refine-fractions")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        baseline = None if args.baseline.lower() == "none" else args.baseline
        records = benchmark(models, args.preset, ratios, device=args.device, threads=args.threads,
                            batch_size=args.batch_size, warmup=args.warmup,
                            repeats=3 if args.repeats is None else args.repeats, train=args.train,
                            model_args=parse_model_args(args.model_arg), baseline=baseline,
                            memory=not args.no_memory, profile=args.profile, amp=args.amp,
                            cuda_graphs=args.cuda_graphs, cpu_fast_path=not args.no_cpu_fast_path,
                            refine_fractions=fractions)
        if args.json:
            write_json(records, args.json)
        if args.markdown:
            write_markdown(records, args.markdown)
        if args.plot:
            write_plot(records, args.plot)
        sys.stdout.write(markdown_table(records))
        return 0

    p.set_defaults(func=run)


def _benchmark_cases(args: argparse.Namespace) -> int:
    from sparseseg.benchmark.case import benchmark_cases, markdown_table, write_markdown
    from sparseseg.benchmark.report import write_json

    models = [m.strip() for m in args.models.split(",") if m.strip()] if not args.checkpoint else None
    repeats = 1 if args.repeats is None else args.repeats
    records = benchmark_cases(args.case, args.checkpoint, models, args.preset, repeats=repeats, threads=args.threads,
                              overlap=args.overlap, sw_batch_size=args.sw_batch_size, prune_ratio=args.prune_ratio,
                              device=args.device, cpu_fast_path=not args.no_cpu_fast_path,
                              skip_background=not args.no_skip_background, crop_foreground=args.crop_foreground,
                              drop_background_tokens=args.drop_background_tokens)
    if args.json:
        write_json(records, args.json)
    if args.markdown:
        write_markdown(records, args.markdown)
    sys.stdout.write(markdown_table(records))
    return 0


def _numbers(text: str | None, flag: str) -> list[float] | None:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]`` (None stays None); SparsesegError naming ``flag`` otherwise."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError as err:
        raise SparsesegError(f"{flag} expects comma-separated numbers, got {text!r}") from err


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="pictures: pruning policy, prediction overlays, training curves",
                       description="Draw PNG pictures; see docs/demo.md for examples.")
    vsub = p.add_subparsers(dest="picture", metavar="PICTURE", required=True)

    pol = vsub.add_parser("policy", help="depth at which each token was pruned, over image slices (paper Fig. 2)")
    pol.add_argument("--checkpoint", required=True, help="checkpoint of a token-pruning model")
    pol.add_argument("--input", required=True, nargs="+", help="one case: a NIfTI file or its channel files")
    pol.add_argument("--output", required=True, help="PNG to write")
    pol.add_argument("--label", default=None, help="reference label map of the case, drawn beside the policy")
    pol.add_argument("--prune-ratio", type=float, default=None, help="test-time pruning ratio (default: trained)")
    pol.add_argument("--drop-background-tokens", action="store_true",
                     help="drop the all-background patch tokens before the first block, as predict does (blue)")
    pol.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="voxel axis held fixed per slice")
    pol.add_argument("--slices", type=int, nargs="+", default=None, help="slice indices (default: 4 spread out)")
    pol.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")

    def run_policy(args: argparse.Namespace) -> int:
        from sparseseg.visualize.plots import plot_policy
        from sparseseg.visualize.policy import policy_from_checkpoint

        pm = policy_from_checkpoint(args.checkpoint, args.input, label=args.label, prune_ratio=args.prune_ratio,
                                    device=args.device, drop_background=args.drop_background_tokens)
        out = plot_policy(pm.image, pm.depth, pm.patch_size, pm.label, output=args.output,
                          num_layers=pm.num_layers, depths=pm.levels, slices=args.slices, axis=args.axis)
        sys.stdout.write(f"wrote {out}\n")
        return 0

    pol.set_defaults(func=run_policy)

    ov = vsub.add_parser("overlay", help="image, reference and prediction(s) on several slices")
    ov.add_argument("--image", required=True, help="NIfTI image (first channel shown)")
    ov.add_argument("--label", default=None, help="reference label map")
    ov.add_argument("--pred", nargs="+", default=[], help="predicted label map(s), each as FILE or NAME=FILE")
    ov.add_argument("--output", required=True, help="PNG to write")
    ov.add_argument("--dataset", default=None, help="dataset.json for the class names")
    ov.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="voxel axis held fixed per slice")
    ov.add_argument("--slices", type=int, nargs="+", default=None, help="slice indices (default: 4 spread out)")

    def run_overlay(args: argparse.Namespace) -> int:
        from sparseseg.visualize.plots import load_overlay_inputs, plot_overlay

        image, label, preds, names = load_overlay_inputs(args.image, args.label, args.pred, args.dataset)
        out = plot_overlay(image, label, preds, output=args.output, class_names=names, slices=args.slices,
                           axis=args.axis)
        sys.stdout.write(f"wrote {out}\n")
        return 0

    ov.set_defaults(func=run_overlay)

    cu = vsub.add_parser("curves", help="training loss, validation Dice and learning rate from RUN_DIR/log.csv")
    cu.add_argument("--run", required=True, nargs="+", help="run folder(s) of `sparseseg train`")
    cu.add_argument("--output", required=True, help="PNG to write")

    def run_curves(args: argparse.Namespace) -> int:
        from sparseseg.visualize.plots import plot_curves

        sys.stdout.write(f"wrote {plot_curves(args.run, args.output)}\n")
        return 0

    cu.set_defaults(func=run_curves)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, run and score unetr and stp_mta_unetr on the ICBM152 brain template",
                       description="Builds a tissue-segmentation dataset from the ICBM152 2009 template shipped with "
                                   "nilearn, trains the dense unetr and the token-pruning stp_mta_unetr (or the "
                                   "--model given) with the same time budget, predicts a held-out anterior block, "
                                   "times CPU inference and writes OUTPUT/report.md; see docs/demo.md.")
    p.add_argument("--output", default="sparseseg_demo", help="output folder (default ./sparseseg_demo)")
    p.add_argument("--quick", action="store_true",
                   help="a short end-to-end check: 4 mm template, tiny models, 3 training steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time per model in minutes (both train at once; default 6; --quick: 3 steps)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--prune-ratio", type=float, default=0.75, help="pruning ratio of stp_mta_unetr (default 0.75)")
    p.add_argument("--model", default="stp_mta_unetr", choices=["stp_mta_unetr", "veloxseg", "tokenseg"],
                   help="the model trained and scored beside the dense unetr (default stp_mta_unetr)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both models (default 3e-3)")
    p.add_argument("--pruned-mask", choices=["before_norm", "after_norm"], default="before_norm",
                   help="stp_mta_unetr: where MTA multiplies the pruned tokens by 1 - M; before_norm (the authors') "
                        "lets only the kept tokens train the scorer, after_norm both (default before_norm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="constructor argument of the --model model (repeatable), e.g. skips=dense for tokenseg")
    p.add_argument("--refine-fraction", type=float, default=0.25,
                   help="also score and time stp_mta_unetr with sparse decoding at this share of full-resolution "
                        "blocks (default 0.25; 1: dense decoding only)")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.config import parse_model_args
        from sparseseg.demo.run import run_demo

        report = run_demo(args.output, quick=args.quick, minutes=args.minutes, device=args.device,
                          prune_ratio=args.prune_ratio, seed=args.seed, model=args.model, lr=args.lr,
                          pruned_mask=args.pruned_mask, model_args=parse_model_args(args.model_arg),
                          refine_fraction=args.refine_fraction)
        sys.stdout.write(f"wrote {report}\n")
        return 0

    p.set_defaults(func=run)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint's network to ONNX or TorchScript",
                       description="Export the network of a checkpoint in inference mode (one ROI window in, "
                                   "logits out, dynamic batch); see docs/pipeline.md.")
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt of `sparseseg train`")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--output", required=True, help="file to write (.onnx or .pt)")
    p.add_argument("--prune-ratio", type=float, default=None, help="test-time token pruning ratio to export")
    p.add_argument("--refine-fraction", type=float, default=None,
                   help="share of the full-resolution blocks the exported decoder computes (sparse decoding)")

    def run(args: argparse.Namespace) -> int:
        from sparseseg.inference.export import export

        out = export(args.checkpoint, args.output, args.format, args.prune_ratio, refine_fraction=args.refine_fraction)
        sys.stdout.write(f"wrote {out}\n")
        return 0

    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    tune_cpu_allocator()  # keep freed tensor memory in the process: see sparseseg/runtime.py
    plain_cublas_addmm()  # GPU: nn.Linear without cuBLASLt's per-call host cost (sparseseg/runtime.py)
    try:
        return int(args.func(args) or 0)
    except SparsesegError as err:  # exit codes: sparseseg/errors.py
        sys.stderr.write(f"sparseseg {args.command}: {err.label}: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
