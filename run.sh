#!/usr/bin/env bash
# One command per job on a fresh machine; it sets everything up itself (idempotent, offline once installed).
#   bash run.sh demo [ARGS]   build an engine for an embedded tiny model (or a given checkpoint) and check it
#   bash run.sh test [ARGS]   run the test suite
#   bash run.sh sdtrt ARGS    any `python -m sdtrt` command
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SDTRT_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.sdtrt-setup"
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return; fi
  python -m pip install -q --upgrade pip
  # The CPU build of torch first: anything that asks for plain `torch` would otherwise pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # No-deps installs: tensorrt-stubs requires the (uninstallable) tensorrt meta package; sdkit's deps pull CUDA torch.
  python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1" "stable-diffusion-sdkit==2.1.5"
  # TensorRT-RTX installs from PyPI alone; its ONNX parser runs without a GPU (CI proves every graph parses).
  python -m pip install -q "tensorrt-rtx-cu12==1.7.1.116" || echo "warning: tensorrt-rtx not installed" >&2
  echo "$want" > "$stamp"
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo) setup; exec python -m sdtrt demo "$@" ;;
  test) setup; exec python -m pytest -q "$@" ;;
  sdtrt) setup; exec python -m sdtrt "$@" ;;
  setup) setup ;;
  *) echo "usage: bash run.sh demo|test|sdtrt|setup [ARGS]" >&2; exit 2 ;;
esac
