#!/usr/bin/env bash
# Re-creates the Forge Neo used by tests/integration/test_real_neo.py, offline on CPU (docs/forge/NEO_SETUP.md):
# Neo v3.5 as vendored by exo101/sd-webui-forge-neo-v3 @ 5692d2d (tree under webui/), a Python 3.11 venv with
# Neo's own pins, this extension's installer run as Neo runs it, a tiny random SD1 checkpoint and a LoRA.
# Sources come from the bare mirror the `fetch` tool made (github:exo101/sd-webui-forge-neo-v3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${NEO_ROOT:?set NEO_ROOT to where Neo goes (outside this repository)}
MIRROR=${NEO_MIRROR:?set NEO_MIRROR to the bare mirror (…/exo101+sd-webui-forge-neo-v3/repo)}
COMMIT=5692d2d1e6c293faf5486f7cb18c27c9a3faa758
PY=${NEO_PY:-$(command -v python3.11)}
NEO="$ROOT/webui"
DATA=${NEO_DATA:-$ROOT/data}

# 1. Sources. webui/extensions/ (exo101's bundled third-party extensions; 12 of their blobs are missing from the
#    mirror, and with --data-dir Neo reads extensions from $DATA/extensions instead) is left out.
if [ ! -f "$NEO/launch.py" ]; then
  mkdir -p "$ROOT"
  git --git-dir="$MIRROR" archive "$COMMIT" webui ':(exclude)webui/extensions' | tar -x -C "$ROOT" || true
  test -f "$NEO/launch.py" && test -f "$NEO/backend/huggingface/runwayml/stable-diffusion-v1-5/unet/config.json"
  mkdir -p "$NEO/extensions"
fi

# 2. venv, in the order Neo's launcher (modules/launch_utils.prepare_environment) installs: torch, packaging +
#    gradio, requirements.txt. torch: PyPI's CUDA 13 build (Neo asks for 2.11.0+cu130 from download.pytorch.org,
#    which is unreachable here); 2.12.1/0.27.1 is what pip settles on with Neo's setuptools==69.5.1 pin (2.14.1 needs
#    setuptools>=77). The machine's /opt/wheels torch 2.13.0+cpu has no matching CPU torchvision.
if [ ! -x "$NEO/venv/bin/python" ]; then "$PY" -m venv "$NEO/venv"; fi
V="$NEO/venv/bin/python"
nice -n 10 "$V" -m pip install -q torch==2.12.1 torchvision==0.27.1
nice -n 10 "$V" -m pip install -q packaging==26.0 gradio==4.40.0 gradio_rangeslider==0.0.8
nice -n 10 "$V" -m pip install -q -r "$NEO/requirements.txt"
"$V" -c "import torch, torchvision; from torchvision.ops import nms; print('torch', torch.__version__, torchvision.__version__)"

# 3. Data folder: this repository linked as an extension, its installer run as Neo runs it (PYTHONPATH=<neo>).
mkdir -p "$DATA/extensions" "$DATA/models/Stable-diffusion" "$DATA/models/Lora"
ln -sfn "$REPO" "$DATA/extensions/sd-webui-trt"
(cd "$NEO" && PYTHONPATH="$NEO" nice -n 10 "$V" "$DATA/extensions/sd-webui-trt/install.py")

# 4. The tiny SD1 checkpoint (tests/integration/tiny_forge_model.py with Neo's import paths and --cpu) and a LoRA.
MODEL="$DATA/models/Stable-diffusion/tiny-forge-sd1.safetensors"
if [ ! -f "$MODEL" ]; then
  # (the same code as tests/integration/forge_host.NEO_MODEL_WRITER: Neo parses its flags when backend.args is
  #  imported, so --cpu must be in sys.argv first; the script's own --always-cpu is Forge's and Neo ignores it)
  (cd "$NEO" && nice -n 10 "$V" -c "
import runpy, sys
script, out = sys.argv[1], sys.argv[2]
sys.path[:0] = ['.', 'modules_forge/packages']
sys.argv = [script, '--cpu']
import backend.args
assert backend.args.args.cpu
sys.argv = [script, out]
runpy.run_path(script, run_name='__main__')
" "$REPO/tests/integration/tiny_forge_model.py" "$MODEL")
fi
LORA="$DATA/models/Lora/tinylora.safetensors"
if [ ! -f "$LORA" ]; then
  nice -n 10 "$V" -c "import sys; from safetensors.torch import load_file; sys.path.insert(0, sys.argv[3]); \
from lora_files import write_lora; \
sd = {k: v for k, v in load_file(sys.argv[1]).items() if k.startswith('model.diffusion_model.')}; \
write_lora(sys.argv[2], sd, 'lora', layers='attn')" "$MODEL" "$LORA" "$REPO/tests"
fi
"$V" -m pip check || true  # expected: gradio 4.40.0 wants pillow<11 (Neo pins 12.2.0), httpcore2 wants h11>=0.16
echo "Neo ready at $NEO (data $DATA)"
