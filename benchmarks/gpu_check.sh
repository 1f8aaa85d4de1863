#!/usr/bin/env bash
# The device check in one call, on a bare CUDA machine with Python >= 3.10 and torch (no network needed there).
#
#   bash benchmarks/gpu_check.sh --prepare [--data FILE]   # once, on a networked machine, in this checkout: the
#        wheels a bare GPU machine lacks into .whl/, the CIFAR-10 JPEG copy (FILE, default $CIFAR10_JPEG or
#        /work/shared/data/cifar10-jpeg.tar.gz) into .devcheck/ (both git-ignored: carry them with the tree)
#   bash benchmarks/gpu_check.sh [--out DIR] [--data FILE|DIR] [--budget S] [--stages a,b] [--device cpu --tiny]
#
# Installs the carried wheels into a temporary folder when hydra, omegaconf or ptflops are missing, extracts the
# JPEG copy (default .devcheck/cifar10-jpeg.tar.gz), runs every stage as its own process under a time limit and
# stops before 9 minutes in all (--budget, default 520 s). Results in DIR (default $GPU_CHECK_OUT, else
# ./gpu-results): summary.md, results.jsonl, stages.log. Options: python -m benchmarks.gpu_check --help.
set -uo pipefail
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}  # the budget counts from here
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime ptflops)  # imported by the stages, absent from a bare image
# found without importing them (ptflops would import torch: seconds)
NEEDED="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('hydra', 'omegaconf', 'antlr4', 'ptflops')))"

version() {  # the version installed here (what the project is tested with), else a known-good one
  "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}

prepare() {
  local data=${CIFAR10_JPEG:-/work/shared/data/cifar10-jpeg.tar.gz}
  while [ $# -gt 0 ]; do
    case $1 in
      --data) data=$2; shift 2 ;;
      *) echo "gpu_check.sh --prepare: unknown option $1; allowed: --data FILE" >&2; exit 2 ;;
    esac
  done
  mkdir -p .whl .devcheck
  rm -f .whl/hydra_core-* .whl/omegaconf-* .whl/antlr4_python3_runtime-* .whl/ptflops-*  # one version of each
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==$(version hydra-core 1.3.2)" "omegaconf==$(version omegaconf 2.3.0)" "ptflops==0.7.5" || exit 1
  # omegaconf's pin has no wheel on the index: build it (pure Python)
  "$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3" || exit 1
  if [ -f "$data" ]; then
    rm -f .devcheck/cifar10-jpeg.tar.gz && cp "$data" .devcheck/cifar10-jpeg.tar.gz && chmod u+w .devcheck/cifar10-jpeg.tar.gz
  else
    echo "gpu_check.sh --prepare: no CIFAR-10 JPEG copy at $data (--data FILE); the epoch stage will be skipped" >&2
  fi
  ls -l .whl .devcheck
  du -ch .whl .devcheck | tail -n 1
  echo "carry .whl and .devcheck with the working tree; then: bash benchmarks/gpu_check.sh --out <results folder>"
}

if [ "${1:-}" = "--prepare" ]; then
  shift
  prepare "$@"
  exit
fi

if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
      || echo "gpu_check.sh: installing the carried wheels failed; stages that need them will say so" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check.sh: ${PACKAGES[*]} not all importable and no wheels in .whl/ (run --prepare on a networked" \
      "machine first); stages that need them will say so" >&2
  fi
fi
"$PY" -m benchmarks.gpu_check "$@"
rc=$?
[ -n "${site:-}" ] && rm -rf "$(dirname "$site")"
exit $rc
