#!/bin/sh
# Entrypoint of the sd-webui-trt image (deploy/docker/Dockerfile); the Helm chart relies on this interface.
#
#   entrypoint.sh [serve]    A1111 1.10.1 with this extension: API (and the browser UI with WEBUI_UI=1)
#   entrypoint.sh prebuild   build every engine of a JSON plan into the engine cache (`python -m sdtrt prebuild`)
#
# Paths: WEBUI_DIR (/opt/webui), WEBUI_PYTHON ($WEBUI_DIR/venv/bin/python); the extension is ../.. of this file.
#
# serve:
#   WEBUI_PORT (7860)         port of the API/UI on every interface (--listen)
#   MODELS_DIR (/models)      A1111-style model tree; each sub-folder that exists becomes a flag:
#                             Stable-diffusion --ckpt-dir, Lora --lora-dir, VAE --vae-dir, embeddings --embeddings-dir,
#                             ControlNet --controlnet-dir (only when an installed extension declares that flag in
#                             its preload.py, i.e. sd-webui-controlnet: A1111 refuses flags nobody declares)
#   WEBUI_CKPT                checkpoint to load at start, relative to $MODELS_DIR/Stable-diffusion (must exist)
#   WEBUI_UI (0)              0: API only (--nowebui); 1: the browser UI too
#   SDTRT_API_AUTH_FILE       file with user:password[,user:password...] (or one per line): checked here, then read
#                             by the extension's preload.py as the default of --api-auth (never on the command line)
#   WEBUI_EXTRA_ARGS          more launch.py flags, split on whitespace
#   SDTRT_CACHE (/engines)    engine cache folder; must exist (mount the shared engine volume there)
# prebuild:
#   SDTRT_PREBUILD_PLAN       the JSON plan (required)
#   MODELS_DIR (/models)      plan checkpoint paths are relative to it
#   SDTRT_CACHE               engine cache folder (required, writable)
# both:
#   HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1 unless set (the image carries what A1111 would download);
#   WEBUI_DRY_RUN=1 prints the command, one argument per line, instead of running it.
#
# Exit codes: 2 usage, 1 configuration error (message on stderr); otherwise the WebUI's or the pre-build's.
#
# Choices (A1111 1.10.1 sources):
# - Always --skip-prepare-environment --skip-install (nothing is installed or cloned at start: the image has it all;
#   they also skip extension installers), --skip-version-check, --no-download-sd-model (no 4 GB SD 1.5 download
#   when no checkpoint is found), --port (the API-only server would otherwise take 7861), --listen (0.0.0.0).
# - Model folders by explicit flags, not --models-dir: A1111 keeps its own models folder (the baked VAE-approx files,
#   folders it creates), so $MODELS_DIR can be a read-only mount.
# - No --no-hashing: A1111 hashes the loaded checkpoint once per start (sd_models.load_model_weights ->
#   calculate_shorthash; the model hash in infotexts and /sdapi/v1/sd-models, checkpoint lookup by hash). The
#   extension needs that hash whenever it serves an engine and reads the file itself when A1111 has none, so the
#   flag would not save the read. Add it with WEBUI_EXTRA_ARGS=--no-hashing if the hashes are not wanted.
set -eu

usage() {
    cat >&2 <<'EOF'
usage: entrypoint.sh [serve|prebuild]
  serve     run A1111 with sd-webui-trt (default); configured by WEBUI_PORT, MODELS_DIR, WEBUI_CKPT, WEBUI_UI,
            SDTRT_API_AUTH_FILE, WEBUI_EXTRA_ARGS, SDTRT_CACHE
  prebuild  build the engines of SDTRT_PREBUILD_PLAN from MODELS_DIR into SDTRT_CACHE
WEBUI_DRY_RUN=1 prints the command instead of running it.
EOF
}

die() {
    printf 'entrypoint: %s\n' "$*" >&2
    exit 1
}

# absolute path without trailing slashes (A1111 makes its path flags absolute against its own working directory,
# which is $WEBUI_DIR, not ours)
abspath() {
    p=$1
    case $p in
        /*) ;;
        *) p=$(pwd)/$p ;;
    esac
    while [ "${#p}" -gt 1 ] && [ "${p%/}" != "$p" ]; do p=${p%/}; done
    printf '%s\n' "$p"
}

mode=${1:-serve}
case $mode in
    serve | prebuild) ;;
    *)
        usage
        printf 'entrypoint: unknown mode %s\n' "$mode" >&2
        exit 2
        ;;
esac
if [ "$#" -gt 1 ]; then
    usage
    printf 'entrypoint: no arguments after the mode are taken (use WEBUI_EXTRA_ARGS for WebUI flags)\n' >&2
    exit 2
fi

EXT_DIR=$(cd "$(dirname "$0")/../.." && pwd)
WEBUI_DIR=$(abspath "${WEBUI_DIR:-/opt/webui}")
WEBUI_PYTHON=${WEBUI_PYTHON:-$WEBUI_DIR/venv/bin/python}
case $WEBUI_PYTHON in
    */*) WEBUI_PYTHON=$(abspath "$WEBUI_PYTHON") ;;
esac
MODELS_DIR=$(abspath "${MODELS_DIR:-/models}")

: "${HF_HUB_OFFLINE:=1}"
: "${TRANSFORMERS_OFFLINE:=1}"
export HF_HUB_OFFLINE TRANSFORMERS_OFFLINE

run() {  # the command is "$@"
    if [ "${WEBUI_DRY_RUN:-0}" = 1 ]; then
        printf '%s\n' "$@"
        exit 0
    fi
    case $1 in
        */*) [ -x "$1" ] || die "WEBUI_PYTHON=$1 is not an executable file" ;;
        *) command -v "$1" >/dev/null 2>&1 || die "WEBUI_PYTHON=$1 is not on PATH" ;;
    esac
    exec "$@"
}

if [ "$mode" = prebuild ]; then
    [ -n "${SDTRT_PREBUILD_PLAN:-}" ] || die "SDTRT_PREBUILD_PLAN is not set: it names the JSON plan of the engines to build"
    plan=$(abspath "$SDTRT_PREBUILD_PLAN")
    if [ ! -f "$plan" ] || [ ! -r "$plan" ]; then
        die "SDTRT_PREBUILD_PLAN=$SDTRT_PREBUILD_PLAN is not a readable file"
    fi
    [ -n "${SDTRT_CACHE:-}" ] || die "SDTRT_CACHE is not set: it names the engine cache folder the engines are built into"
    SDTRT_CACHE=$(abspath "$SDTRT_CACHE")
    [ -d "$SDTRT_CACHE" ] || die "SDTRT_CACHE=$SDTRT_CACHE is not a directory (mount the engine cache volume there)"
    [ -w "$SDTRT_CACHE" ] || die "SDTRT_CACHE=$SDTRT_CACHE is not writable by uid $(id -u) (the pre-build writes engines there)"
    [ -d "$MODELS_DIR" ] || die "MODELS_DIR=$MODELS_DIR is not a directory (the plan's checkpoints are relative to it)"
    export SDTRT_CACHE
    PYTHONPATH=$EXT_DIR/extension${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONPATH
    run "$WEBUI_PYTHON" -m sdtrt prebuild "$plan" --models "$MODELS_DIR" --cache "$SDTRT_CACHE" --json
fi

# ---- serve ---------------------------------------------------------------------------------------------------
SDTRT_CACHE=$(abspath "${SDTRT_CACHE:-/engines}")
[ -d "$SDTRT_CACHE" ] || die "SDTRT_CACHE=$SDTRT_CACHE is not a directory: mount the engine cache there (the volume the pre-build Job fills) or point SDTRT_CACHE at one"
export SDTRT_CACHE

WEBUI_PORT=${WEBUI_PORT:-7860}
case $WEBUI_PORT in
    '' | *[!0-9]* | ??????*) die "WEBUI_PORT=$WEBUI_PORT is not a port number" ;;
esac
if [ "$WEBUI_PORT" -lt 1 ] || [ "$WEBUI_PORT" -gt 65535 ]; then die "WEBUI_PORT=$WEBUI_PORT is not a port number"; fi

set -- "$WEBUI_PYTHON" "$WEBUI_DIR/launch.py" \
    --api --listen --port "$WEBUI_PORT" \
    --skip-install --skip-prepare-environment --skip-version-check --no-download-sd-model

case ${WEBUI_UI:-0} in
    0 | false | no) set -- "$@" --nowebui ;;
    1 | true | yes) ;;
    *) die "WEBUI_UI=${WEBUI_UI} is neither 0 (API only) nor 1 (browser UI too)" ;;
esac

if [ -d "$MODELS_DIR/Stable-diffusion" ]; then set -- "$@" --ckpt-dir "$MODELS_DIR/Stable-diffusion"; fi
if [ -d "$MODELS_DIR/Lora" ]; then set -- "$@" --lora-dir "$MODELS_DIR/Lora"; fi
if [ -d "$MODELS_DIR/VAE" ]; then set -- "$@" --vae-dir "$MODELS_DIR/VAE"; fi
if [ -d "$MODELS_DIR/embeddings" ]; then set -- "$@" --embeddings-dir "$MODELS_DIR/embeddings"; fi
if [ -d "$MODELS_DIR/ControlNet" ] && grep -Eqs -e "[\"']--controlnet-dir[\"']" "$WEBUI_DIR"/extensions/*/preload.py; then
    set -- "$@" --controlnet-dir "$MODELS_DIR/ControlNet"
fi

if [ -n "${WEBUI_CKPT:-}" ]; then
    ckpt=$MODELS_DIR/Stable-diffusion/$WEBUI_CKPT
    [ -f "$ckpt" ] || die "WEBUI_CKPT=$WEBUI_CKPT: no such checkpoint $ckpt (it is relative to \$MODELS_DIR/Stable-diffusion)"
    set -- "$@" --ckpt "$ckpt"
fi

if [ -n "${SDTRT_API_AUTH_FILE:-}" ]; then
    f=$SDTRT_API_AUTH_FILE
    if [ ! -f "$f" ] || [ ! -r "$f" ]; then die "SDTRT_API_AUTH_FILE=$f is not a readable file"; fi
    # entries separated by ',' or new lines, each trimmed; A1111 splits --api-auth on ',' then ':'
    auth=$(tr -d '\r' <"$f" | tr ',' '\n' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | grep -v '^$' | paste -sd, -) ||
        die "SDTRT_API_AUTH_FILE=$f cannot be read"
    [ -n "$auth" ] || die "SDTRT_API_AUTH_FILE=$f is empty: it must hold user:password[,user:password...]"
    bad=$(printf '%s\n' "$auth" | tr ',' '\n' | awk -F: 'NF != 2 || $1 == "" || $2 == "" { print NR; exit }')
    [ -z "$bad" ] || die "SDTRT_API_AUTH_FILE=$f: entry $bad is not user:password (exactly one ':' and no ',' in a user name or password; A1111 splits on both)"
    # not passed as --api-auth (A1111 prints its arguments, and /proc shows them): the extension's preload.py reads
    # the file and makes it --api-auth's default
    SDTRT_API_AUTH_FILE=$(abspath "$f")
    export SDTRT_API_AUTH_FILE
fi

if [ -n "${WEBUI_EXTRA_ARGS:-}" ]; then
    set -f # split on whitespace, never expand globs
    # shellcheck disable=SC2086
    set -- "$@" $WEBUI_EXTRA_ARGS
    set +f
fi

cd "$WEBUI_DIR" || die "WEBUI_DIR=$WEBUI_DIR is not a directory"
if [ "${WEBUI_DRY_RUN:-0}" != 1 ] && [ ! -f "$WEBUI_DIR/launch.py" ]; then
    die "no A1111 at WEBUI_DIR=$WEBUI_DIR (launch.py is missing)"
fi
run "$@"
