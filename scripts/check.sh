#!/usr/bin/env bash
# Static checks: ruff (lint), import-linter (the layering rules of shared/DESIGN.md) and mypy
# (types of gateway, consumers, protocols, bots and settings; configured in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "[test]"
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/mypy
