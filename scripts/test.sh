#!/usr/bin/env bash
# Install what the tests need (system packages when missing, the project with its test
# extras into .venv) and run the whole suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
{ command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM_PATH:-}" ]; } || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing system packages: ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ensure_venv "[test]"
exec .venv/bin/python -m pytest "$@"
