#!/usr/bin/env bash
# Set-up (venv + install with the test extra) then the whole test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" "test"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# --durations: the slowest tests are listed in every run (CI logs included), to keep the suite within budget
exec python -m pytest -q --durations=20 "$@"
