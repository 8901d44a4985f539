#!/usr/bin/env bash
# One command per job on a fresh machine; it sets everything up itself (idempotent, offline once installed).
#   bash run.sh demo [ARGS]   build an engine for an embedded tiny model (or a given checkpoint) and check it
#   bash run.sh test [ARGS]   run the test suite
#   bash run.sh sdtrt ARGS    any `python -m sdtrt` command
#   bash run.sh test-a1111 [ARGS]  the core, fake-host, API and install tests in A1111 1.10.1's own environment
#                             (Python 3.10, torch 2.1.2, numpy 1.26.2, protobuf 3.20.0, onnx 1.12.0, ...)
#   bash run.sh gpu-wheels [DIR]   download what the GPU runbook installs (split into parts of at most 60 MiB)
#   bash run.sh gpu-runbook [--dry-run]  on a GPU machine without an index: baselines, TensorRT-RTX, GPU tests, JSON
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SDTRT_VENV:-.venv}
PY=${PYTHON:-python3}

# enter_venv PYTHON: create $VENV with PYTHON if needed and activate it; succeeds when it is already set up for
# this pyproject.toml and run.sh (then nothing is installed: offline once installed). mark_venv records that.
enter_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$1" -m venv "$VENV" || { echo "run.sh: cannot create $VENV with $1" >&2; exit 2; }
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate" || exit 2
  [ "$(cat "$VENV/.sdtrt-setup" 2>/dev/null)" = "$(venv_wanted)" ]
}
venv_wanted() { cat pyproject.toml run.sh | sha256sum | cut -c1-16; }
mark_venv() { venv_wanted > "$VENV/.sdtrt-setup"; }

setup() {
  if enter_venv "$PY"; then return; fi
  python -m pip install -q --upgrade pip
  # The CPU build of torch first: anything that asks for plain `torch` would otherwise pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # No-deps installs: tensorrt-stubs requires the (uninstallable) tensorrt meta package; sdkit's deps pull CUDA torch.
  python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1" "stable-diffusion-sdkit==2.1.5"
  # TensorRT-RTX installs from PyPI alone; its ONNX parser runs without a GPU (CI proves every graph parses).
  python -m pip install -q "tensorrt-rtx-cu12==1.7.1.116" || echo "warning: tensorrt-rtx not installed" >&2
  # TensorRT 11.4's Python bindings, read (never imported) by the check that the backend uses no removed API
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$VENV/sdtrt-wheels" "tensorrt-cu12-bindings==11.4.0.106" \
    || echo "warning: TensorRT 11 bindings wheel not downloaded (its API check will skip)" >&2
  mark_venv
}

# A1111 1.10.1 as its launcher installs it: Python 3.10, torch 2.1.2 + torchvision 0.16.2 from PyPI (a CUDA
# build; it runs on the CPU), and the versions its requirements_versions.txt pins (those our code touches).
A1111_PINS=(
  "torch==2.1.2" "torchvision==0.16.2" "numpy==1.26.2" "protobuf==3.20.0" "onnx==1.12.0" "onnxruntime==1.23.2"
  "safetensors==0.4.2" "gradio==3.41.2" "fastapi==0.94.0" "pydantic>=1.10,<1.11" "transformers==4.30.2"
  "httpx==0.24.1" "httpcore==0.15" "Pillow==9.5.0" "einops==0.4.1" "omegaconf==2.2.3" "setuptools==69.5.1"
)

find_python310() {
  if [ -n "${SDTRT_PYTHON310:-}" ]; then echo "$SDTRT_PYTHON310"; return; fi
  if command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'import sys; assert sys.version_info[:2] == (3, 10)' \
      2>/dev/null; then command -v python3.10; return; fi
  local p
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  return 1
}

setup_a1111() {
  VENV=${SDTRT_A1111_VENV:-.venv-a1111}
  local py
  py=$(find_python310) || { echo "run.sh: Python 3.10 is needed for the A1111 environment (set SDTRT_PYTHON310)" >&2; exit 2; }
  if enter_venv "$py"; then return; fi
  local constraints="$VENV/a1111-constraints.txt"
  printf '%s\n' "${A1111_PINS[@]}" > "$constraints"
  python -m pip install -q "pip==24.0"
  python -m pip install -q -c "$constraints" "torch==2.1.2" "torchvision==0.16.2"
  # the extension as A1111's venv gets it (its pins held), and what the tests use beside it
  python -m pip install -q -c "$constraints" -e . "numpy==1.26.2" "protobuf==3.20.0" "onnx==1.12.0" \
    "onnxruntime==1.23.2" "safetensors==0.4.2" "gradio==3.41.2" "fastapi==0.94.0" "transformers==4.30.2" \
    pytest pytest-timeout hypothesis einops pillow omegaconf httpx "pydantic>=1.10,<1.11"
  # TensorRT-RTX builds (ahead of time, no GPU) in the users' environment too; float16 ones need a GPU there
  python -m pip install -q -c "$constraints" "tensorrt-rtx-cu12==1.7.1.116" || echo "warning: tensorrt-rtx not installed" >&2
  # consistent apart from sdkit below (installed without its deps on purpose)
  local broken
  broken=$(python -m pip check 2>&1 | grep -v -e '^stable-diffusion-sdkit ' -e '^No broken requirements' || true)
  if [ -n "$broken" ]; then echo "run.sh: the A1111 environment is inconsistent: $broken" >&2; exit 2; fi
  # A1111's own ldm UNet code, for the parity tests (its declared deps would pull another torch)
  python -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
  mark_venv
}

# What the GPU runbook installs on a machine without a package index (Python 3.12, CUDA 13 there), downloaded here;
# wheels over 60 MiB are split into NAME.whl.part-aa, -ab, ... (the device tool carries at most 64 MiB per call).
gpu_wheels() {
  local dest=${1:-wheels} py=${GPU_PYTHON_VERSION:-3.12} w
  mkdir -p "$dest"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "tensorrt-rtx-cu13-bindings==1.7.1.116" "tensorrt-rtx-cu13-libs==1.7.1.116" \
    safetensors pyyaml pytest pluggy iniconfig packaging pygments
  python3 -m pip wheel -q --no-deps -w "$dest" "tensorrt-rtx-cu13==1.7.1.116"  # an sdist on PyPI: made a wheel here
  for w in "$dest"/*.whl; do
    [ -f "$w" ] || continue
    if [ "$(stat -c %s "$w")" -gt $((60 * 1024 * 1024)) ]; then split -b 60M "$w" "$w.part-" && rm "$w"; fi
  done
  ls -l "$dest"
}

cmd=${1:-demo}
shift || true
# The page code's own tests (javascript/sdtrt.js), with Node's built-in test runner (Node >= 18; Debian: nodejs).
page_tests() {
  if ! command -v node >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get install -y -q nodejs >/dev/null || { echo "run.sh: cannot install nodejs" >&2; exit 2; }
    else
      echo "run.sh: the page tests need Node.js >= 18 (Debian: apt-get install nodejs)" >&2; exit 2
    fi
  fi
  node --test tests/js/ >/dev/null || { node --test tests/js/; echo "run.sh: page tests failed" >&2; exit 1; }
  echo "page tests (node --test tests/js): passed"
}

case "$cmd" in
  demo) setup; exec python -m sdtrt demo "$@" ;;
  test) setup; page_tests; exec python -m pytest -q "$@" ;;
  sdtrt) setup; exec python -m sdtrt "$@" ;;
  test-a1111) setup_a1111; exec python -m pytest -q "$@" ;;
  setup) setup ;;
  setup-a1111) setup_a1111 ;;
  # On a GPU machine with no package index: its own Python and torch, the wheels in ./wheels (see gpu-wheels).
  gpu-runbook) wheels=(); [ -d "${SDTRT_WHEELS:-wheels}" ] && wheels=(--wheels "${SDTRT_WHEELS:-wheels}")
    PYTHONPATH="extension${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m sdtrt runbook ${wheels[@]+"${wheels[@]}"} \
      --out "${OUT:-runbook-out}" "$@" ;;
  gpu-wheels) gpu_wheels "$@" ;;
  *) echo "usage: bash run.sh demo|test|test-a1111|sdtrt|setup|setup-a1111|gpu-runbook|gpu-wheels [ARGS]" >&2; exit 2 ;;
esac
