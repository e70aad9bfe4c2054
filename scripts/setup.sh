# Sourced by ./kettle and ./run-tests: make .venv ready, installing what is missing.
# PyTorch is pinned on purpose: with an NVIDIA GPU, PyPI's Linux wheel of torch is the CUDA build;
# without one, pip takes a local CPU build when the machine provides it (find-links), else PyPI's.
# KETTLE_TORCH_SPEC overrides the pin, e.g. for a CPU-only build from PyTorch's own index.
set -euo pipefail
KETTLE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KETTLE_VENV:-$KETTLE_ROOT/.venv}"
TORCH_SPEC="${KETTLE_TORCH_SPEC:-torch==2.13.0}"

kettle_python() {
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "kettle: Python 3.10 or newer is needed; install it and run this again" >&2
    return 1
}

kettle_setup() {
    local extras="$1" stamp want
    stamp="$VENV/.kettle-setup-$extras"
    want="$(cat "$KETTLE_ROOT/pyproject.toml" "$KETTLE_ROOT/scripts/setup.sh" | cksum)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "kettle: setting up $VENV (first run, or the dependencies changed)..." >&2
    if [ ! -x "$VENV/bin/python" ]; then
        "$(kettle_python)" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        echo "kettle: installing PyTorch ($TORCH_SPEC)..." >&2
        "${pip[@]}" install "$TORCH_SPEC"
    fi
    if [ "$extras" = "test" ]; then
        "${pip[@]}" install -e "$KETTLE_ROOT[test]"
    else
        "${pip[@]}" install -e "$KETTLE_ROOT"
    fi
    echo "$want" > "$stamp"
}
