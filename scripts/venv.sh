# shellcheck shell=bash
# ensure_venv EXTRAS: create .venv with Python 3.11+ and install the project (with EXTRAS,
# e.g. "[test]") unless the same install is already there.
ensure_venv() {
    local extras="$1" python stamp
    python="${PYTHON:-}"
    if [ -z "$python" ]; then
        for candidate in python3.11 python3.12 python3.13 python3; do
            if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
        done
    fi
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "Python 3.11 or newer is required (found $("$python" --version))" >&2; exit 1; }
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    stamp=".venv/.installed${extras}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".${extras}"
        touch "$stamp"
    fi
}
