#!/usr/bin/env bash
# Start lllyasviel's Forge (dfdcbab) offline on CPU, API only. Usage: start_forge.sh [PORT]  (log: docs/forge/forge.log)
set -euo pipefail
: "${FORGE_DIR:?set FORGE_DIR}" "${FORGE_DATA:?set FORGE_DATA}"
PORT=${1:-7861}
cd $FORGE_DIR
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec nice -n 10 venv/bin/python launch.py --skip-prepare-environment --skip-install --skip-torch-cuda-test \
  --skip-python-version-check --skip-version-check --always-cpu --nowebui --api --port "$PORT" \
  --server-name 127.0.0.1 --data-dir $FORGE_DATA --ckpt-dir $FORGE_DATA/models/Stable-diffusion \
  --ckpt $FORGE_DATA/models/Stable-diffusion/tiny-forge-sd1.safetensors
