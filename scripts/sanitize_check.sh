#!/usr/bin/env bash
# Builds the CPU code with AddressSanitizer + UndefinedBehaviorSanitizer (UCGM_SANITIZE=ON, CUDA off)
# in a throwaway virtualenv and runs the kernel tests (tests/test_*_ops.py and test_cpu_isa.py: every compiled op, all
# dtypes, awkward sizes, non-contiguous views) under it; arguments go to pytest instead. Python itself is not instrumented,
# so the ASan runtime is preloaded; leak checking is off because CPython and torch keep allocations
# alive at exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SANITIZE_VENV:-$(mktemp -d)/venv}
python3 -m venv --system-site-packages "$venv"
# Run from a virtualenv (CI's), --system-site-packages reaches the base interpreter's packages, not the
# virtualenv's: a .pth file adds those (torch, pytest, the build tools the README installed). The
# sanitized ucgm_fast installs into the new venv, which comes first on sys.path.
if [ -n "${VIRTUAL_ENV:-}" ]; then
  site() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
  site python3 > "$(site "$venv/bin/python")/_parent_venv.pth"
fi
# The build backend (pyproject.toml's [build-system] requires) goes into the sanitizer's venv: a
# plain `pip install .` builds in an isolated environment, so neither CI's virtualenv nor a bare
# base interpreter has it (a CI run failed on "No module named 'scikit_build_core'").
"$venv/bin/python" - <<'PY' > "$venv/build-requires.txt"
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY
"$venv/bin/python" -m pip install -q -r "$venv/build-requires.txt"
"$venv/bin/python" -m pip install -q --no-build-isolation \
  -Ccmake.define.UCGM_SANITIZE=ON -Ccmake.define.UCGM_ENABLE_CUDA=OFF -Cbuild-dir=build/sanitize .
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$venv/bin/python" -c "import ucgm_fast; assert ucgm_fast.build_info()['sanitize'], 'not a sanitized build'"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_*_ops.py tests/test_cpu_isa.py)
"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" "${tests[@]}"
