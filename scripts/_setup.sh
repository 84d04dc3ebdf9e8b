# Sourced by demo.sh and test.sh: make .venv if absent and install the package (+ extras) into it.
# Re-installs only when pyproject.toml or the requested extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
STAMP=".venv/.dspark-installed${EXTRAS:+-$EXTRAS}"
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing dspark_jax${EXTRAS:+[$EXTRAS]} (editable)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -m pip install -e ".${EXTRAS:+[$EXTRAS]}" > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log >&2
    echo "[setup] pip install failed; full log in .venv/install.log" >&2
    exit 1
  fi
  python -c "import dspark_jax" || { echo "[setup] dspark_jax does not import after install" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
