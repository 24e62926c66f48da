#!/usr/bin/env bash
# Static checks: ruff (lint) and import-linter (the layering rules of shared/DESIGN.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "[test]"
.venv/bin/ruff check .
.venv/bin/lint-imports
