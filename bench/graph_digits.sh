#!/usr/bin/env bash
# Regenerates the tables of docs/graphs.md: timm models with derived unit graphs, trained on digits at 32x32.
# Trains two test_resnet (20 epochs) and two small ViTs (test_vit, 4x4 patches, AdamW, 50 epochs) from seeds 0 and 1
# on all ten digits, and two of each on digits 0-4 (seed 2) and 5-9 (seed 3); fuses each pair with permutation
# matching, OT fusion (EMD; weights and activations) and ZipIt! (each also with BatchNorm statistics recomputed,
# +recompute_bn), zips each task pair (ZipIt! vs average and permute, with every correction of conf/zip.yaml), then prints the
# markdown tables (bench/graph_table.py). About 55 minutes on 2 shared CPU cores.
# Run from the repository root: bash bench/graph_digits.sh   (GRAPH_OUT=<folder> to write elsewhere; extra
# arguments go to every command, e.g. device=cpu; SKIP_TRAIN=1 reuses trained models)
set -euo pipefail
OUT=${GRAPH_OUT:-outputs/graph_digits}
declare -A EPOCHS=([resnet]=20 [vit]=50)
declare -A MODEL=(
  [resnet]="model=timm model.name=test_resnet"
  [vit]="model=timm model.name=test_vit ++model.kwargs={img_size:32,patch_size:4} optimizer=adamw optimizer.lr=0.001"
)
train() {  # arch, run folder, overrides...
  local arch=$1 dir=$2; shift 2
  # shellcheck disable=SC2086
  python train.py ${MODEL[$arch]} dataset.image_size=32 train.epochs="${EPOCHS[$arch]}" ema.decays=[] progress=false \
    "hydra.run.dir=$OUT/$arch/$dir" "$@"
}
for arch in resnet vit; do
  if [ -z "${SKIP_TRAIN:-}" ]; then
    train $arch all/seed0 seed=0 "$@"
    train $arch all/seed1 seed=1 "$@"
    train $arch tasks/a seed=2 'dataset.classes=[0,1,2,3,4]' "$@"
    train $arch tasks/b seed=3 'dataset.classes=[5,6,7,8,9]' "$@"
  fi
  python fuse.py --multirun "models=$OUT/$arch/all/*" dataset.image_size=32 merge=permute \
    merge.alignment=weights,activations progress=false "hydra.sweep.dir=$OUT/fuse/$arch/permute" "$@"
  python fuse.py --multirun "models=$OUT/$arch/all/*" dataset.image_size=32 merge=ot merge.solver=emd \
    merge.alignment=weights,activations progress=false "hydra.sweep.dir=$OUT/fuse/$arch/ot" "$@"
  python fuse.py "models=$OUT/$arch/all/*" dataset.image_size=32 merge=zipit progress=false \
    "hydra.run.dir=$OUT/fuse/$arch/zipit/0" "$@"
  python zip.py "models=$OUT/$arch/tasks/*" dataset.image_size=32 progress=false "hydra.run.dir=$OUT/zip/$arch" "$@"
done
python bench/graph_table.py "$OUT"
