#!/usr/bin/env bash
# The GPU check in one go (bench/gpu_check.py says what it measures): about 5 minutes,
# at most 9.5 (pytest 150 s, the benchmark 360 s, each stopped at its limit):
#
#   bash bench/gpu_check.sh                # a GPU machine: wheels in .whl/ (what it lacks:
#                                          # fastapi, uvicorn, pydantic, redis, threadpoolctl
#                                          # ...), results in $OUT
#   bash bench/gpu_check.sh --cpu-dry-run  # here: device cpu, tiny durations, the installed
#                                          # packages; checks the script before a GPU run
#   bash bench/gpu_check.sh --no-tests --arch fasterrcnn_mobilenet_v3_large_320_fpn --quick
#                                          # options after these go to bench/gpu_check.py
#
# The project need not be installed: `import cvserve` comes from a temporary folder whose
# cvserve/ holds links to app/, worker/ and models/ (pyproject.toml's package-dir mapping).
# Every stage has a time limit; every process it starts ends before it returns.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
DRY_RUN=0
TESTS=1
[ "${1:-}" = "--cpu-dry-run" ] && DRY_RUN=1 && shift
[ "${1:-}" = "--no-tests" ] && TESTS=0 && shift
if [ "$DRY_RUN" = 0 ]; then
  # What the machine lacks (fastapi, uvicorn, pydantic, redis ...), from wheels carried along.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
SHIM=$(mktemp -d /tmp/cvserve-shim.XXXXXX)
mkdir "$SHIM/cvserve"  # no __init__.py: cvserve is a namespace package when installed too
for part in app worker models; do ln -s "$REPO/$part" "$SHIM/cvserve/$part"; done
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1

main() {
  echo "=== machine"
  nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import cvserve.worker.gpu as g, torch, torchvision; print('cvserve from', \
g.__file__); print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda available', torch.cuda.is_available())" || return 1

  if [ "$TESTS" = 1 ]; then
    echo "=== tests/test_gpu_path.py"
    # -W: an ini option of a pytest plugin absent here (timeout) must not fail the run, nor
    # the deprecation warning of torch.jit.load that torch 2.11 gives and 2.14 does not.
    timeout 150 python3 -m pytest tests/test_gpu_path.py -q -p no:cacheprovider \
      -W ignore::pytest.PytestConfigWarning \
      -W 'ignore:`torch.jit.load` is deprecated:DeprecationWarning' 2>&1 | tee "$OUT/pytest.log"
    tail -n 1 "$OUT/pytest.log" > "$OUT/pytest-summary.txt"
  fi

  echo "=== bench/gpu_check.py"
  local args=(--out "$OUT" --tests "$OUT/pytest-summary.txt" "$@")
  [ "$DRY_RUN" = 1 ] && args+=(--cpu-dry-run --budget-s 150)
  # SIGTERM at the limit (the script then stops its service), SIGKILL 20 s later.
  timeout -k 20 360 python3 bench/gpu_check.py "${args[@]}"
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
rm -rf "$SHIM"
exit "$status"
