#!/usr/bin/env bash
# The GPU tables of docs/benchmark.md and docs/veloxseg.md, one JSON + Markdown pair per run in OUT_DIR:
# brats, btcv and VeloxSeg's PET/CT setting in float32 and with --amp (float16 autocast, the recipe of
# `sparseseg train` on a GPU), inference as CUDA-graph replays; then brats with --amp as plain eager calls, and a
# profile of one brats forward pass.
#
#     bash scripts/gpu_benchmarks.sh OUT_DIR [REPEATS]
#
# Runs `sparseseg benchmark`, or `python3 -m sparseseg benchmark` where the package is on PYTHONPATH only.
set -euo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT_DIR [REPEATS]}
repeats=${2:-20}
mkdir -p "$out"
if command -v sparseseg >/dev/null; then bench=(sparseseg benchmark); else bench=(python3 -m sparseseg benchmark); fi
common=(--device cuda --warmup 5 --repeats "$repeats" --train)
velox=(--models unetr,veloxseg --model-arg img_size=96 --model-arg in_channels=2 --model-arg out_channels=2
       --model-arg patch_size=16 --model-arg decoder=original --model-arg "modalities=[1, 1]")

for prec in fp32 amp; do
    flag=(--cuda-graphs); [[ $prec == amp ]] && flag+=(--amp)
    "${bench[@]}" --preset brats --models unetr,stp_mta_unetr --prune-ratios 0.25,0.5,0.75,0.9 \
        "${common[@]}" "${flag[@]}" --json "$out/brats_$prec.json" --markdown "$out/brats_$prec.md" --plot "$out/brats_$prec.png"
    "${bench[@]}" --preset btcv --models unetr,stp_mta_unetr --prune-ratios 0.9 \
        "${common[@]}" "${flag[@]}" --json "$out/btcv_$prec.json" --markdown "$out/btcv_$prec.md"
    "${bench[@]}" "${velox[@]}" "${common[@]}" "${flag[@]}" \
        --json "$out/veloxseg_$prec.json" --markdown "$out/veloxseg_$prec.md"
done
"${bench[@]}" --preset brats --models unetr,stp_mta_unetr --prune-ratios 0.25,0.5,0.75,0.9 "${common[@]}" --amp \
    --json "$out/brats_amp_eager.json" --markdown "$out/brats_amp_eager.md"
for prec in fp32 amp; do
    flag=(); [[ $prec == amp ]] && flag=(--amp)
    "${bench[@]}" --preset brats --models unetr,stp_mta_unetr --prune-ratios 0.75 --profile --no-memory \
        --device cuda --warmup 5 --repeats 5 "${flag[@]}" --markdown "$out/brats_profile_$prec.md"
done
