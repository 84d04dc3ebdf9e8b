#!/usr/bin/env bash
# Set-up (venv + install with the test extra) then the whole test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" "test"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q "$@"
