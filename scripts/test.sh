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
ARGS=(-q --durations=20 -n "${DSPARK_TEST_WORKERS:-2}" --dist loadfile --max-worker-restart=0 "$@")
export DSPARK_TEST_TIMINGS="${DSPARK_TEST_TIMINGS:-$(mktemp)}"     # every test's outcome, as it happens
log="$(mktemp)"
set +e
python -m pytest "${ARGS[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# A long-lived worker used to die natively (SIGSEGV inside an XLA:CPU compile) near the end of a run: it had used up
# vm.max_map_count memory mappings (every compiled program holds its own); tests/conftest.py now drops jax's caches
# before that. Kept as a safety net: when the only failures are native crashes, the tests that had not passed yet
# run once more in fresh workers (DSPARK_TEST_NO_RESUME=1 turns this off); any other failure ends the run as it is.
crashed=$(grep -o "crashed while running '[^']*'" "$log" | sed "s/crashed while running '//; s/'$//" | sort -u || true)
if [ "$rc" -ne 0 ] && [ -n "$crashed" ] && [ -z "${DSPARK_TEST_NO_RESUME:-}" ]; then
  failed=$(awk -F'\t' '$4 == "failed" {print $3}' "$DSPARK_TEST_TIMINGS" | sort -u)
  others=$(comm -23 <(echo "$failed") <(echo "$crashed") | grep -v '^$' || true)
  if [ -z "$others" ]; then
    echo "[test] a worker died natively while running: $crashed"
    echo "[test] no other test failed: running the tests that have not passed yet once more, in fresh workers"
    DSPARK_TEST_SKIP_DONE="$DSPARK_TEST_TIMINGS" python -m pytest "${ARGS[@]}"
    rc=$?
  fi
fi
exit "$rc"
