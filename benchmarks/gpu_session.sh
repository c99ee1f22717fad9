#!/usr/bin/env bash
# One GPU session in one call (benchmarks/gpu_session.py): installs the peer wheels
# carried in .whl/ (see README, "GPU status"), then runs the tests, the sweep and the
# report, after `python -m dft_kernels` (the doctor). Usage:
#   bash benchmarks/gpu_session.sh [--dry-run] [--out DIR] [--name NAME]
# (Python: $PYTHON, else .venv/bin/python when it exists, else python3.)
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON if set, else the project's virtual environment when there is one, else python3
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY="${PYTHON:-python3}"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="${TMPDIR:-/tmp}/dft_kernels_peers"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the doctor first (docs/design.md sec. 16): versions, every kernel natively against float64,
# the timings at the Llama-3-8B head; its JSON goes next to the session's report (a failing
# kernel is reported there and the session still runs)
DOCTOR=(--json --vocab 128256 --hidden 4096 --tokens 4096)
case " $* " in *" --dry-run "*) DOCTOR=(--json --cpu --skip-timing) ;; esac
mkdir -p benchmarks/results
doctor_json="benchmarks/results/$(date +%Y%m%d-%H%M%S)_doctor.json"
timeout 180 "$PY" -m dft_kernels "${DOCTOR[@]}" > "$doctor_json" || echo "doctor: exit $? (see $doctor_json)" >&2
exec "$PY" -m benchmarks.gpu_session "$@"
