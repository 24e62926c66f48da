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
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx)
{ command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM_PATH:-}" ]; } || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing system packages: ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

ensure_venv "[test]"
# The whole suite (no arguments) runs on GATEWAY_TEST_WORKERS pytest-xdist workers (default
# 2: most tests wait on servers and sockets, not the CPU; 1 runs it in this process).
# With arguments, pytest gets exactly them.
workers="${GATEWAY_TEST_WORKERS:-2}"
parallel=()
[ $# -ne 0 ] || [ "$workers" -le 1 ] || parallel=(-n "$workers")
# Both stages run whatever the first one gives; the script fails if either failed.
status=0
.venv/bin/python -m pytest "${parallel[@]}" "$@" || status=$?

# The whole suite (no arguments) also runs the storage tests on PostgreSQL: the machine's
# (127.0.0.1:5432, trust auth) unless GATEWAY_TEST_DATABASE_URL says otherwise;
# GATEWAY_TEST_POSTGRES=0 skips them.
if [ $# -eq 0 ] && [ "${GATEWAY_TEST_POSTGRES:-1}" != 0 ]; then
    url="${GATEWAY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/gateway}"
    echo "Storage tests on PostgreSQL: $url"
    pg_status=0
    DATABASE_URL="$url" .venv/bin/python -m pytest -q "${parallel[@]}" tests/test_units.py \
        tests/test_consumer.py tests/test_http.py tests/test_bots.py \
        tests/test_room_policy.py tests/test_conversation.py tests/test_relay.py \
        tests/test_group_commit.py tests/test_room_log.py tests/test_message_life.py \
        tests/test_api.py tests/test_policy.py tests/test_retention.py tests/test_files.py \
        tests/test_devices.py tests/test_devices_units.py \
        || pg_status=$?
    echo "Stages: whole suite exit $status; storage tests on PostgreSQL exit $pg_status"
    [ "$status" -ne 0 ] || status=$pg_status
fi
exit "$status"
