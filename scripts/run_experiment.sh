#!/usr/bin/env bash
# The "Must hold" experiment on one dataset: multi-step training, few-step tuning from it,
# and the scores the README reports. Needs the whole machine (each training run has a 9.5-minute
# wall-clock budget in its config). Usage:
#   scripts/run_experiment.sh [digits|fashion_mnist] [RUNS_DIR] [extra overrides for both runs...]
set -euo pipefail
name="${1:-digits}"; runs="${2:-runs}"; shift $(( $# > 2 ? 2 : $# )) || true
py="${PYTHON:-python}"
ev="$py -m ucgm_fast.eval_cli --repeats ${REPEATS:-6}"
ms="$runs/${name}_multistep"; fs="$runs/${name}_fewstep"
log="$runs/${name}_results.txt"; mkdir -p "$runs"; : > "$log"

t0=$(date +%s)
$py -m ucgm_fast.train --config "configs/${name}_multistep.yaml" output_dir="$ms" "$@"
t1=$(date +%s)
ms_ckpt=$(ls "$ms"/checkpoints/*.pt | sort | tail -1)
$py -m ucgm_fast.train --config "configs/${name}_fewstep.yaml" output_dir="$fs" train.init_from="$ms_ckpt" "$@"
t2=$(date +%s)
fs_ckpt=$(ls "$fs"/checkpoints/*.pt | sort | tail -1)

{
  echo "multi-step training: $((t1 - t0)) s wall ($ms_ckpt); few-step tuning: $((t2 - t1)) s wall ($fs_ckpt)"
  # FD of 1000 samples moves by ~10% between sample sets: each figure is the mean of $REPEATS sets (default 6).
  echo "== multi-step model, 30 steps, order 2 (Heun: 15 steps on 16 grid points, 29 model calls)"
  $ev --ckpt "$ms_ckpt" --steps 30 --order 2 --grid "$runs/${name}_ms30.png"
  echo "== multi-step model, 30 steps, order 1 (Euler)"; $ev --ckpt "$ms_ckpt" --steps 30 --order 1
  echo "== multi-step model, 30 steps, order 1, extrapol_ratio 0.5"
  $ev --ckpt "$ms_ckpt" --steps 30 --order 1 --extrapol-ratio 0.5
  # --order 1: at 2 steps the config's order 2 would leave a single grid point (one model call).
  echo "== multi-step model, 2 steps";   $ev --ckpt "$ms_ckpt" --steps 2 --order 1 --grid "$runs/${name}_ms2.png"
  echo "== multi-step model, 2 steps, few-step sampler settings"
  $ev --ckpt "$ms_ckpt" --steps 2 --order 1 --stochast-ratio 1.0 --rfba-gap-steps 0.001 0.6
  echo "== few-step model, 2 steps";              $ev --ckpt "$fs_ckpt" --steps 2 --grid "$runs/${name}_fs2.png"
} 2>&1 | tee -a "$log"
echo "results in $log; grids $runs/${name}_{ms30,ms2,fs2}.png; training grids in $ms/samples, $fs/samples"
