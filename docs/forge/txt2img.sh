#!/usr/bin/env bash
# One 4-step 64x64 txt2img over the API; prints the response's info and saves the image. Usage: txt2img.sh [PORT] [OUT.png] [PROMPT]
PORT=${1:-7861}; OUT=${2:-/tmp/forge-txt2img.png}; PROMPT=${3:-a cat}
curl -s -X POST "http://127.0.0.1:$PORT/sdapi/v1/txt2img" -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"$PROMPT\", \"steps\": 4, \"width\": 64, \"height\": 64, \"seed\": 1, \"sampler_name\": \"Euler\", \"cfg_scale\": 7}" \
  -o /tmp/forge-resp.json -w 'HTTP %{http_code} in %{time_total}s\n'
$FORGE_DIR/venv/bin/python - "$OUT" <<'PY'
import base64, json, sys
r = json.load(open("/tmp/forge-resp.json"))
if "images" not in r:
    print(r); sys.exit(1)
open(sys.argv[1], "wb").write(base64.b64decode(r["images"][0]))
info = json.loads(r["info"])
print({k: info.get(k) for k in ("sd_model_name", "steps", "width", "height", "seed", "sampler_name")}, "->", sys.argv[1])
print("comments/extra:", info.get("extra_generation_params"))
PY
