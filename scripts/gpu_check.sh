#!/usr/bin/env bash
# Build, test and benchmark ucgm_fast on a CUDA machine with no network access.
#
#   bash scripts/gpu_check.sh
#
# 1. pip install --no-build-isolation --no-deps . (uses the machine's torch, scikit-build-core,
#    pybind11, CMake and ninja; builds only for this GPU's architecture unless UCGM_CUDA_ARCHS is set)
# 2. prints ucgm_fast.build_info()
# 3. runs the test suite (its CUDA-parametrized tests run here); a failure does not stop the script
# 4. runs python benchmarks/run.py --device cuda --quick over the op groups
# 5. profile: benchmarks/profile_objective.py (where the objective step's time goes, fused and eager)
# 6. variants: builds and runs benchmarks/cuda_mix_variants.cu (the transport kernels against variants
#    that change one thing each, at 64M float32)
# 7. the end-to-end group (DiT training step and sampling; compiles a DiT, so it has its own time limit)
# STAGES (default "install tests bench profile variants e2e") picks the steps; an unknown name is an
# error. Within a 10-minute command limit, one call does it all (as on the H100, 2026-11-27: build
# 24 s, CUDA tests 90 s, op benchmark 25-50 s, end to end 203 s, sampling rows first):
#   DEADLINE=565 TEST_TIMEOUT=150 BENCH_TIMEOUT=150 E2E_TIMEOUT=320 PYTEST_ARGS="-q tests -k cuda" \
#     bash scripts/gpu_check.sh
# A device lease of 15 minutes (start included) holds one such call. E2E_ARGS (default --quick) passes
# options to the end-to-end benchmark: E2E_ARGS="" runs the full set (DiT-B/2 and DiT-XL/2 training
# steps at both lambdas, model eager and compiled); every end-to-end row has been measured on the
# H100 (2026-11-27). The full op set (240 rows, about 8 minutes on the H100) needs more than one
# call; every row of it has run there (2026-11-27, in three calls over two leases: --match
# '^(interpolate|decode|coefficients)/' selects the transport group, --ops objective sampler the rest).
# A lease with nothing new to measure makes one call: the CUDA tests, the quick op rows, the objective
# profile and the variants (about 4 minutes):
#   DEADLINE=330 TEST_TIMEOUT=150 BENCH_TIMEOUT=100 PYTEST_ARGS="-q tests -k cuda" \
#     STAGES="install tests bench profile variants" bash scripts/gpu_check.sh
# (E2E_SUFFIX, default _e2e, names that stage's result files: <gpu><suffix>.*; BENCH_ARGS, default
# --quick, passes options to the op benchmark).
# Results: <gpu>.{json,md,png}, <gpu>_e2e.*, <gpu>_pytest.log, <gpu>_profile.txt and <gpu>_variants.txt
# (e.g. nvidia-h100.json), written straight into $OUT when it is set (so whatever a killed call had written still comes back) and
# copied into benchmarks/results/ as each stage ends; the whole log is gpu_check.log. Exit status: 0
# only when every step passed. Environment: PYTHON (default python3), PYTEST_ARGS (default "-q tests"),
# TEST_TIMEOUT / BENCH_TIMEOUT / E2E_TIMEOUT in seconds (default 240, 180, 240: the whole check stays
# under 12 minutes with the build), and DEADLINE: when set, the whole script's budget in seconds; each
# stage's limit is cut to what is left of it, so a single call with a hard limit still gets every
# stage's results back (the benchmark writes the rows it measured when its limit stops it, and each
# stage's files are copied into $OUT as soon as it ends).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d -t ucgm_gpu_check.XXXXXX)}
mkdir -p "$LOGS" benchmarks/results
export PYTHONUNBUFFERED=1

STAGES=" ${STAGES:-install tests bench profile variants e2e} "
for stage in $STAGES; do
  case "$stage" in
    install|tests|bench|profile|variants|e2e) ;;
    *) echo "gpu_check: unknown stage '$stage' in STAGES; valid: install tests bench profile variants e2e (space-separated)" >&2
       exit 2 ;;
  esac
done
want() { [[ "$STAGES" == *" $1 "* ]]; }
START=$(date +%s)
# limit CAP: CAP seconds, or less when DEADLINE leaves less (20 s kept for copying results).
limit() {
  local cap=$1
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - ($(date +%s) - START) - 20 ))
    [ "$left" -lt "$cap" ] && cap=$left
  fi
  [ "$cap" -lt 1 ] && cap=1
  echo "$cap"
}
# Results are written into $OUT when it is set (a call killed mid-stage still returns what it wrote).
RESULTS=${OUT:-benchmarks/results}
# keep NAME...: list a stage's result files and copy them into benchmarks/results/ (the checkout's copy).
keep() {
  local f
  for f in "$@"; do
    if [ -f "$RESULTS/$f" ]; then
      ls -l "$RESULTS/$f"
      if [ "$RESULTS" != benchmarks/results ]; then cp "$RESULTS/$f" benchmarks/results/; fi
    else
      echo "missing: $f"
    fi
  done
}

main() {
failed=()

step() { printf '\n=== %s (%s UTC)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
if ! "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "torch sees no CUDA device: nothing to check here"; return 1
fi

CAP=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")  # e.g. 90
if [ -z "${UCGM_CUDA_ARCHS:-}" ]; then  # this GPU only: about half the nvcc time of the default list
  export UCGM_CUDA_ARCHS=$CAP
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

if want install; then
  step "install (UCGM_CUDA_ARCHS=${UCGM_CUDA_ARCHS:-default})"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir .; then
    echo "install failed: see the log above"; return 1
  fi
fi

step "build_info"
# Run from outside the checkout so the installed package, not the source tree, is imported.
if ! (cd /tmp && "$PY" -c "
import json, ucgm_fast
info = ucgm_fast.build_info()
print(json.dumps(info, indent=1))
assert info.get('cuda_available_at_runtime'), 'ucgm_fast was built without CUDA kernels or cannot see the GPU'
"); then
  failed+=("build_info"); echo "build_info: CUDA kernels missing"
fi

NAME=$("$PY" -c "
import sys, torch
sys.path.insert(0, 'benchmarks')
from harness.env import slug
print(slug(torch.cuda.get_device_name()))")
NAME=${NAME:-cuda}

if want tests; then
  step "tests: pytest ${PYTEST_ARGS:--q tests}"
  # shellcheck disable=SC2086
  timeout -k 10 "$(limit "${TEST_TIMEOUT:-240}")" "$PY" -m pytest ${PYTEST_ARGS:--q tests} -rfEs -p no:cacheprovider 2>&1 \
    | tee "$RESULTS/${NAME}_pytest.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { failed+=("tests (exit $rc)"); echo "tests failed (exit $rc); going on"; }
  keep "${NAME}_pytest.log"
fi

if want bench; then
  step "benchmark: benchmarks/run.py --device cuda ${BENCH_ARGS---quick} --name $NAME"
  # shellcheck disable=SC2086
  timeout -k 10 "$(limit "${BENCH_TIMEOUT:-180}")" "$PY" benchmarks/run.py --device cuda ${BENCH_ARGS---quick} --name "$NAME" \
    --out-dir "$RESULTS" --ops transport objective sampler
  rc=$?
  [ "$rc" -eq 0 ] || { failed+=("benchmark (exit $rc)"); echo "benchmark failed (exit $rc)"; }
  keep "$NAME".{json,md,png}
fi

if want profile; then
  step "profile: benchmarks/profile_objective.py"
  timeout -k 10 "$(limit "${PROFILE_TIMEOUT:-90}")" "$PY" benchmarks/profile_objective.py --device cuda \
    --out "$RESULTS/${NAME}_profile.txt"
  rc=$?
  [ "$rc" -eq 0 ] || { failed+=("profile (exit $rc)"); echo "profile failed (exit $rc)"; }
  keep "${NAME}_profile.txt"
fi

if want variants; then
  step "variants: benchmarks/cuda_mix_variants.cu (sm_$CAP)"
  bin=$(mktemp -t mix_variants.XXXXXX)
  # Built as the extension builds its kernels (--fmad=false: the variants must give the shipped bits).
  if timeout -k 10 "$(limit 120)" nvcc -O3 -std=c++17 --expt-relaxed-constexpr --fmad=false \
       -arch="sm_$CAP" -DUCGM_WITH_CUDA -Icsrc benchmarks/cuda_mix_variants.cu \
       csrc/cuda/transport_ops.cu -o "$bin"; then
    timeout -k 10 "$(limit "${VARIANTS_TIMEOUT:-90}")" "$bin" 2>&1 | tee "$RESULTS/${NAME}_variants.txt"
    rc=${PIPESTATUS[0]}
  else
    rc=$?; echo "nvcc failed (exit $rc)"
  fi
  [ "$rc" -eq 0 ] || { failed+=("variants (exit $rc)"); echo "variants failed (exit $rc)"; }
  keep "${NAME}_variants.txt"
fi

if want e2e; then
  E2E_NAME="${NAME}${E2E_SUFFIX:-_e2e}"
  step "benchmark: end to end (DiT training step, sampling) --name $E2E_NAME"
  # shellcheck disable=SC2086
  timeout -k 10 "$(limit "${E2E_TIMEOUT:-240}")" "$PY" benchmarks/run.py --device cuda ${E2E_ARGS---quick} \
    --name "$E2E_NAME" --out-dir "$RESULTS" --ops end_to_end
  rc=$?
  [ "$rc" -eq 0 ] || { failed+=("end-to-end benchmark (exit $rc)"); echo "end-to-end benchmark failed (exit $rc)"; }
  keep "$E2E_NAME".{json,md,png}
fi

if [ -n "${OUT:-}" ]; then
  # A device call returns at most 8 files: the charts stay behind; draw them from the JSON with
  # python benchmarks/run.py --redraw benchmarks/results/<gpu>.json ...
  rm -f "$OUT"/*.png
fi
step "results (in $RESULTS; copied into benchmarks/results as each stage ended)"
if [ ${#failed[@]} -eq 0 ]; then
  echo "gpu_check: all steps passed ($NAME)"
else
  echo "gpu_check: FAILED: ${failed[*]}"; return 1
fi
}

# Everything is also logged to $OUT/gpu_check.log; the pipeline waits for tee to finish writing it.
main 2>&1 | tee "$LOGS/gpu_check.log"
exit "${PIPESTATUS[0]}"
