#!/usr/bin/env bash
# Set-up (venv + install with the test extra) then the whole test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" "test"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# --durations: the slowest tests are listed in every run (CI logs included), to keep the suite within budget
# two workers, one test file each at a time (module fixtures are built once): the suite is mostly single-threaded
# compilation, so on the 2-core CI machine this takes 12 min instead of 20. DSPARK_TEST_WORKERS=0 runs in-process.
# --max-worker-restart=0: a worker that dies (a native crash) fails the run at once, naming its test; replacing it
# under --dist loadfile can hang the whole run (pytest-xdist#784, fixed upstream after 3.8), as one CI run did.
exec python -m pytest -q --durations=20 -n "${DSPARK_TEST_WORKERS:-2}" --dist loadfile --max-worker-restart=0 "$@"
