"""Build-time helper of deploy/docker/Dockerfile: puts into the image the files A1111 1.10.1 downloads on first use,
so that a replica downloads nothing (it runs with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1), and checks them.

    python offline_assets.py fetch --webui /opt/webui --clip-revision SHA   # with network, during the build
    python offline_assets.py check --webui /opt/webui                       # with the network switched off

Run it with the WebUI's Python (its transformers and huggingface_hub come from A1111's requirements).

What A1111 fetches, and from where (A1111 1.10.1 sources):
- SD1 and SDXL text encoders: `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")` and the
  `CLIPTextModel` config of the same repository (ldm/sgm `FrozenCLIPEmbedder`). The weights come from the
  checkpoint (`sd_disable_initialization.DisableInitialization` skips the download), the tokenizer files and
  config.json come from the Hugging Face hub through its cache ($HF_HOME/hub). Only *.json and *.txt are baked.
- Live previews (`modules/sd_vae_approx.py`): `models/VAE-approx/model.pt` is in A1111's git tree; the SDXL and SD3
  ones are downloaded from the v1.0.0-pre release into `<models_path>/VAE-approx/` on first use.
Not baked (not used by txt2img/img2img with default settings): upscaler and face-restoration weights, TAESD.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_PATTERNS = ["*.json", "*.txt"]
#: modules/sd_vae_approx.py: download_model(model_path, '<this>' + model_name)
VAE_APPROX_URL = "https://github.com/AUTOMATIC1111/stable-diffusion-webui/releases/download/v1.0.0-pre/"
VAE_APPROX_DOWNLOADED = ("vaeapprox-sdxl.pt", "vaeapprox-sd3.pt")
VAE_APPROX_IN_GIT = ("model.pt",)


def vae_approx_dir(webui: Path) -> Path:
    """<models_path>/VAE-approx with A1111's default models_path (<data dir>/models, the data dir being the WebUI
    folder). The entrypoint passes no --models-dir or --data-dir, so this is where A1111 looks first."""
    return webui / "models" / "VAE-approx"


def fetch(webui: Path, clip_revision: str) -> None:
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(CLIP_REPO, revision=clip_revision, allow_patterns=CLIP_PATTERNS))
    # offline lookups of the default revision read refs/main; a download by commit hash does not write it
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(snapshot.name)
    print(f"{CLIP_REPO}@{snapshot.name}: {sorted(p.name for p in snapshot.iterdir())}")

    target = vae_approx_dir(webui)
    target.mkdir(parents=True, exist_ok=True)
    for name in VAE_APPROX_DOWNLOADED:
        dest = target / name
        if dest.is_file():
            continue
        part = dest.with_name(dest.name + ".part")
        with urllib.request.urlopen(VAE_APPROX_URL + name, timeout=120) as r, open(part, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
        os.replace(part, dest)
        print(f"{dest}: {dest.stat().st_size} bytes")


def check(webui: Path) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var) != "1":
            raise SystemExit(f"check runs with {var}=1 (it proves nothing is downloaded at run time)")
    import torch
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_REPO)
    if ",</w>" not in tokenizer.get_vocab():  # sd_hijack_clip looks up the comma token
        raise SystemExit(f"{CLIP_REPO}: the tokenizer has no ',</w>' token")
    config = CLIPTextConfig.from_pretrained(CLIP_REPO)
    print(f"{CLIP_REPO}: vocabulary {len(tokenizer)}, hidden size {config.hidden_size}")
    for name in VAE_APPROX_IN_GIT + VAE_APPROX_DOWNLOADED:
        path = vae_approx_dir(webui) / name
        state = torch.load(path, map_location="cpu")
        if not isinstance(state, dict) or not state:
            raise SystemExit(f"{path}: not a state dict")
        print(f"{path}: {len(state)} tensors")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--webui", type=Path, required=True)
    f.add_argument("--clip-revision", required=True, help="commit of openai/clip-vit-large-patch14 on the hub")
    c = sub.add_parser("check")
    c.add_argument("--webui", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        fetch(args.webui, args.clip_revision)
    else:
        check(args.webui)
    return 0


if __name__ == "__main__":
    sys.exit(main())
