#!/usr/bin/env bash
# Regenerates the digits tables of docs/fusion.md: trains 4 mlpnets (15 epochs) and 2 resnet20 x1 (10 epochs) from
# seeds 0-3 (validation split fixed by dataset.split_seed, shared by every model), fuses them with every method
# (experiment=fusion_digits: without and with merge.correction=recompute_bn, 1 epoch of retraining; one fuse.py multirun per method family and setting),
# then prints the markdown tables collected from the results.json files (bench/fusion_table.py).
# Run from the repository root: bash bench/fusion_digits.sh   (FUSION_OUT=<folder> to write elsewhere;
# extra arguments go to every command, e.g. device=cpu; SKIP_TRAIN=1 reuses trained parents)
set -euo pipefail
OUT=${FUSION_OUT:-outputs/fusion_digits}
if [ -z "${SKIP_TRAIN:-}" ]; then
  python train.py --multirun seed=0,1,2,3 model=mlpnet train.epochs=15 ema.decays=[] progress=false \
    "hydra.sweep.dir=$OUT/mlpnet" "$@"
  python train.py --multirun seed=0,1 model=resnet20 model.width=1 train.epochs=10 ema.decays=[] progress=false \
    "hydra.sweep.dir=$OUT/resnet20" "$@"
fi
fuse() {  # setting, models, extra overrides...
  local setting=$1 models=$2; shift 2
  python fuse.py --multirun experiment=fusion_digits "models=$models" merge=permute \
    merge.alignment=weights,activations progress=false "hydra.sweep.dir=$OUT/fuse/$setting/permute" "$@"
  python fuse.py --multirun experiment=fusion_digits "models=$models" merge=ot merge.alignment=weights,activations \
    merge.solver=emd,sinkhorn merge.normalize=max merge.reg=0.01 progress=false \
    "hydra.sweep.dir=$OUT/fuse/$setting/ot" "$@"
}
fuse mlpnet-2 "[$OUT/mlpnet/0_*,$OUT/mlpnet/1_*]" "$@"
fuse mlpnet-4 "$OUT/mlpnet/*" "$@"
fuse resnet20-2 "$OUT/resnet20/*" "$@"
python bench/fusion_table.py "$OUT/fuse"
