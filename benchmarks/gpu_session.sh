#!/usr/bin/env bash
# One GPU session in one call (benchmarks/gpu_session.py): installs the peer wheels
# carried in .whl/ (see README, "GPU status"), then runs the tests, the sweep and the
# report. Usage: bash benchmarks/gpu_session.sh [--dry-run] [--out DIR] [--name NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="${TMPDIR:-/tmp}/dft_kernels_peers"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_session "$@"
