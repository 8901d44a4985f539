#!/usr/bin/env bash
# Re-creates lllyasviel's Forge dfdcbab offline on CPU at $FORGE_DIR (sources, repositories, venv).
# Sources come from the local bare mirrors made by the `fetch` tool ($FORGE_MIRRORS/<owner>+<name>/repo)
set -euo pipefail
FORGE=${FORGE_DIR:?set FORGE_DIR to where Forge goes}
M=${FORGE_MIRRORS:?set FORGE_MIRRORS to the folder holding the bare mirrors the fetch tool made}
clone_at() { # mirror dir, commit, dest
  if [ ! -d "$3/.git" ]; then git clone -q --no-checkout "$M/$1/repo" "$3"; fi
  git -C "$3" -c advice.detachedHead=false checkout -q "$2"
  test "$(git -C "$3" rev-parse HEAD)" = "$2"
}
clone_at lllyasviel+stable-diffusion-webui-forge dfdcbab685e57677014f05a3309b48cc87383167 "$FORGE"
# launch_utils.git_clone() compares origin remote + HEAD; point origin at the real URLs like a normal install
git -C "$FORGE" remote set-url origin https://github.com/lllyasviel/stable-diffusion-webui-forge.git
mkdir -p "$FORGE/repositories"
clone_at AUTOMATIC1111+stable-diffusion-webui-assets 6f7db241d2f8ba7457bac5ca9753331f0c266917 "$FORGE/repositories/stable-diffusion-webui-assets"
clone_at lllyasviel+huggingface_guess 84826248b49bb7ca754c73293299c4d4e23a548d "$FORGE/repositories/huggingface_guess"
clone_at salesforce+BLIP 48211a1594f1321b00f14c9f7a5b4813144b2fb9 "$FORGE/repositories/BLIP"
git -C "$FORGE/repositories/stable-diffusion-webui-assets" remote set-url origin https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets.git
git -C "$FORGE/repositories/huggingface_guess" remote set-url origin https://github.com/lllyasviel/huggingface_guess.git
git -C "$FORGE/repositories/BLIP" remote set-url origin https://github.com/salesforce/BLIP.git

PY310=${PY310:-$(command -v python3.10)}
if [ ! -x "$FORGE/venv/bin/python" ]; then "$PY310" -m venv "$FORGE/venv"; fi
V="$FORGE/venv/bin/python"
nice -n 10 "$V" -m pip install -q --upgrade pip
nice -n 10 "$V" -m pip install -q torch==2.3.1 torchvision==0.18.1
nice -n 10 "$V" -m pip install -q -r "$FORGE/requirements_versions.txt"
nice -n 10 "$V" -m pip install -q joblib
"$V" -m pip check
echo "Forge ready at $FORGE"
