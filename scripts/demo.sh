#!/usr/bin/env bash
# Set-up (venv + install) then the main job on the embedded default; no downloads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh" plot   # matplotlib for the acceptance plot
exec python -m dspark_jax.cli demo "$@"
