#!/bin/sh
# Kubernetes probes for the sd-webui-trt image (exec probes; curl is in the image).
#
#   probe.sh live    GET http://127.0.0.1:$WEBUI_PORT/sdapi/v1/memory answers 200: the WebUI process serves its API
#                    (an /sdapi/v1 route: /internal/ping only exists with the browser UI). With SDTRT_API_AUTH_FILE
#                    set, sends the first user:password of that file as Basic credentials (A1111's --api-auth).
#   probe.sh ready   GET /sdtrt/v1/ready answers 200: the checkpoint is loaded (and, with SDTRT_REQUIRE_ENGINE=1,
#                    its engine). No credentials: the route answers everyone.
#
# Exit 0 when the answer is 200; 1 otherwise, with one line on stderr saying why (the HTTP status and the start of
# the body, e.g. /ready's reasons, or curl's error); 2 on a usage error. PROBE_TIMEOUT (5 s) bounds the request.
# Credentials go to curl on stdin, never on its command line (visible in the process list).
set -eu

usage() {
    printf 'usage: probe.sh live|ready\n' >&2
}

case ${1:-} in
    live) path=/sdapi/v1/memory ;;
    ready) path=/sdtrt/v1/ready ;;
    *)
        usage
        exit 2
        ;;
esac
what=$1
url=http://127.0.0.1:${WEBUI_PORT:-7860}$path

oneline() {  # $1 flattened to one line of at most 300 characters
    printf '%s' "$1" | tr '\r\n\t' '   ' | sed -e 's/  */ /g' -e 's/ $//' | cut -c1-300
}

fail() {
    printf 'probe %s: %s\n' "$what" "$(oneline "$*")" >&2
    exit 1
}

config=
if [ "$what" = live ] && [ -n "${SDTRT_API_AUTH_FILE:-}" ]; then
    f=$SDTRT_API_AUTH_FILE
    if [ ! -f "$f" ] || [ ! -r "$f" ]; then fail "SDTRT_API_AUTH_FILE=$f is not a readable file"; fi
    cred=$(tr -d '\r' <"$f" | tr ',' '\n' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | grep -v '^$' | head -n 1) ||
        fail "SDTRT_API_AUTH_FILE=$f cannot be read"
    case $cred in
        ?*:?*) ;;
        *) fail "SDTRT_API_AUTH_FILE=$f holds no user:password" ;;
    esac
    # curl config syntax: a quoted value with \ and " escaped
    config=$(printf 'user = "%s"\n' "$(printf '%s' "$cred" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')")
fi

timeout=${PROBE_TIMEOUT:-5}
if out=$(printf '%s\n' "$config" | curl -q -sS --noproxy "*" --max-time "$timeout" -K - -w '\n%{http_code}' "$url" 2>&1); then
    code=$(printf '%s\n' "$out" | tail -n 1)
    [ "$code" = 200 ] && exit 0
    fail "GET $url answered HTTP $code: $(printf '%s\n' "$out" | sed '$d')"
fi
fail "GET $url failed: $(printf '%s\n' "$out" | sed '$d')"
