#!/usr/bin/env bash
# After `bash scripts/demo.sh --quick` (whose venv holds the runtime dependencies and the plot extra only, no test
# extra): the other user-facing commands on tiny inputs, so a runtime dependency that only the test extra brings in
# fails here instead of reaching users. Uses the quick demo's target and DSpark draft. Arg: the demo's work dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK="${1:-demo_out}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
source .venv/bin/activate
if python -c "import torch" 2>/dev/null; then
  echo "[check_runtime] note: torch is installed in .venv (the test extra): this check is weaker than on a fresh clone"
fi
set -x
dspark train --config tiny optim.max_steps=5 log.progress=false output_dir="$OUT/train"
test -f "$OUT/train/draft/config.json"
head -n 3 "$WORK/corpus/heldout.jsonl" > "$OUT/conversations.jsonl"
dspark generate-data --target "$WORK/target" --input "$OUT/conversations.jsonl" --output "$OUT/regenerated.jsonl" \
  --max-new-tokens 16 --no-progress
test "$(wc -l < "$OUT/regenerated.jsonl")" -eq 3
dspark eval --target "$WORK/target" --draft "$WORK/drafts/dspark/draft" --data-dir "$WORK/eval_data" \
  --max-samples 2 --max-new-tokens 16 --no-progress --out "$OUT/eval"
dspark generate --target "$WORK/target" --prompt "def add(a, b):" --max-new-tokens 8
set +x
if dspark generate --target "$WORK/target" --prompt-ids "1,2,999999" 2> "$OUT/err.txt"; then
  echo "[check_runtime] an out-of-vocab prompt was accepted" >&2; exit 1
fi
if [ "$(wc -l < "$OUT/err.txt")" -ne 1 ] || ! grep -q '^error: ' "$OUT/err.txt"; then
  echo "[check_runtime] bad input should print one 'error:' line, got:" >&2; cat "$OUT/err.txt" >&2; exit 1
fi
echo "[check_runtime] runtime commands ran with the runtime dependencies only"
