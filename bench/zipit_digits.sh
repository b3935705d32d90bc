#!/usr/bin/env bash
# Regenerates the digits 0-4 / 5-9 tables of docs/zipit.md: trains two task models per setting (different seeds),
# zips them with every method, prints each table. Run from the repository root: bash bench/zipit_digits.sh
# Extra arguments go to every command (e.g. device=cpu).
set -euo pipefail
run() {  # experiment, extra overrides...
  local experiment=$1; shift
  python train.py --multirun "experiment=$experiment" zipit_task=a,b progress=false "$@"
  python zip.py "experiment=$experiment" progress=false "$@"
}
run zipit_digits_mlpnet "$@"
run zipit_digits_resnet20 model.width=1 "$@"
run zipit_digits_resnet20 model.width=4 "$@"
