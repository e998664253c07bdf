#!/usr/bin/env bash
# The Flax side of every benchmark on one accelerator, one table (benchmarks/gpu_suite.py; sized for < 8 minutes on
# one H100/H200, not yet verified on a GPU). On a CPU backend it runs the small CI-sized form (--size cpu-small) unless told otherwise.
#   bash benchmarks/gpu.sh [--parts blocks,cam,models,train] [--dtypes float32,bfloat16] [--repeats 5] [--json out.json]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
cd "$root"
exec "$py" benchmarks/gpu_suite.py "$@"
