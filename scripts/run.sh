#!/usr/bin/env bash
# Install the gateway into .venv (on first use, or when pyproject.toml changed) and start it
# on embedded defaults: SQLite file, in-memory channel layer. Arguments go to `gateway run`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ""
exec .venv/bin/gateway run "$@"
