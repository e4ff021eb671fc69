# Sourced by run.sh and test.sh: create or reuse .venv/ at the repository root and
# install the pinned requirements when they changed since the last install.
# Needs only Python 3.11 and pip on the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"

if [ ! -x "$VENV/bin/python" ]; then
    PYTHON=""
    for candidate in python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            PYTHON="$candidate"
            break
        fi
    done
    if [ -z "$PYTHON" ]; then
        echo "error: Python 3.11 is needed (python3.11 or python3 on PATH)" >&2
        exit 1
    fi
    echo "creating the virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

# EXTRA_REQUIREMENTS: more requirement files to install beside requirements.txt (test.sh adds the
# optional cluster launchers, so that their configs are tested); run.sh needs none.
REQUIREMENTS=("$ROOT/requirements.txt")
for extra in ${EXTRA_REQUIREMENTS:-}; do
    REQUIREMENTS+=("$ROOT/$extra")
done
wanted="$(cat "${REQUIREMENTS[@]}" | sha256sum | cut -d' ' -f1)"
# the stamp holds one line per installed set, so that run.sh and test.sh do not undo each other
if ! grep -qx "$wanted" "$STAMP" 2>/dev/null; then
    echo "installing the pinned requirements into $VENV (first use only)" >&2
    args=()
    for file in "${REQUIREMENTS[@]}"; do
        args+=(-r "$file")
    done
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${args[@]}"
    echo "$wanted" >> "$STAMP"
fi

# The repository root is a package path for every entry point (python pretrain.py,
# python cdsr_baseline/train.py, python benchmarks/...): a .pth file in the environment says so,
# as an editable install would, without building anything.
PTH="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/taesar-root.pth"
[ "$(cat "$PTH" 2>/dev/null)" = "$ROOT" ] || echo "$ROOT" > "$PTH"

export PATH="$VENV/bin:$PATH"
# Runs never reach out: wandb stays offline unless a config asks otherwise, and
# no library phones home for updates.
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_SILENT="${WANDB_SILENT:-true}"
export HYDRA_FULL_ERROR="${HYDRA_FULL_ERROR:-0}"
cd "$ROOT"
