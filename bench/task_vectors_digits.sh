#!/usr/bin/env bash
# Regenerates docs/task_vectors.md's tables: pretrain an MLPNet (400-200-32) on digits 0-4 of a 200-image subsample,
# fine-tune it once per task (0-4, 5-9, rotated, inverted, blurred), train the multi-task model, then merge the five
# fine-tuned models with every soup and task-vector method (soup.py) and the pair 0-4 / 5-9 with the task vectors and
# the alignment methods (zip.py); all of it once per seed (TV_SEEDS, default "0 1 2"), then print the first seed's
# tables and every seed's averages. Run from the repository root:
#   bash bench/task_vectors_digits.sh        (about three minutes on 2 idle CPUs)
# Extra arguments go to every command (e.g. device=cpu); TV_DIR sets the output folder.
set -euo pipefail
root=${TV_DIR:-outputs/task_vectors_digits}
methods=ensemble,uniform,greedy,task_arithmetic,ties,dare,model_stock,fisher,regmean
runs=()
for seed in ${TV_SEEDS:-0 1 2}; do
  dir=$root/seed$seed
  runs+=("$dir")
  common=(experiment=task_vectors_digits "tv_dir=$dir" progress=false "seed=$seed" "$@")
  python train.py "${common[@]}"
  python finetune.py --multirun "${common[@]}" tv_task=lo,hi,rotated,inverted,blurred
  python finetune.py experiment=task_vectors_digits_multitask "tv_dir=$dir" progress=false "seed=$seed" "$@"
  python soup.py "${common[@]}" "merge=[$methods]"
  python soup.py "${common[@]}" merge=dare merge.dare.combine=ties "hydra.run.dir=$dir/soup_dare_ties"
  pair="[$dir/finetune/lo,$dir/finetune/hi]"
  python soup.py "${common[@]}" "ingredients=$pair" multitask=null "merge=[$methods,slerp]" \
    "hydra.run.dir=$dir/soup_pair"
  python zip.py "models=$pair" progress=false "seed=$seed" "hydra.run.dir=$dir/zip_pair" "$@"
done
python bench/task_vectors_table.py "${runs[@]}"
