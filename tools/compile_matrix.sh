#!/usr/bin/env bash
# The compile gate (python -m dft_kernels.tools.compile_check) under several Triton
# releases: one small virtual environment per release beside the project's own
# (its torch, numpy and tqdm are reused through a .pth file; only triton is
# installed), then one summary table version x arch x dtype x kernel under
# benchmarks/results/ (docs/design.md sec. 16).
#
#   tools/compile_matrix.sh [VERSION ...]       default: the releases in TRITON_VERSIONS
#   PYTHON=.venv/bin/python JOBS=1 GATE_ARGS="--op fused --dtype bf16" tools/compile_matrix.sh 3.2.0
#
# Environment: PYTHON (the project's interpreter, default .venv/bin/python), ARCHS
# (default every architecture of the gate, one gate run each; ARCHS="": interpreter tests only), JOBS
# (compile processes, default 1), GATE_ARGS (extra arguments of the gate, e.g. --arch,
# --dtype, --op), OUT (the summary, default benchmarks/results/compile_matrix.md),
# MATRIX_DIR (where the environments live, default build/compile_matrix).
# The release PYTHON itself has is run in PYTHON's environment (nothing installed); sm_90a
# runs add --wgmma-probe (the "wgmma serialized" rule must fire on a serialising kernel);
# cells impl="auto" sends to PyTorch under a release (linear_config.TRITON_UNSUPPORTED,
# e.g. Triton 3.2 on Blackwell) are listed, not compiled (GATE_ARGS=--include-unsupported
# compiles them).
# Under each release the kernels' interpreter tests run too (INTERP_TESTS, default the
# float64 references of every op and the GPU-faithful tests; INTERP_TESTS="" skips them):
# their summary line is a row of the table's second section.
# The matrix of benchmarks/results/compile_matrix.md:
#   GATE_ARGS="--dtype bf16 --dtype fp16 --dtype fp32 --dtype tf32" tools/compile_matrix.sh 3.2.0 3.6.0 3.9.0
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-1}
GATE_ARGS=${GATE_ARGS:-}
OUT=${OUT:-benchmarks/results/compile_matrix.md}
MATRIX_DIR=${MATRIX_DIR:-build/compile_matrix}
TRITON_VERSIONS=${TRITON_VERSIONS:-"3.2.0 3.6.0 3.9.0"}
ARCHS=${ARCHS-"sm_75 sm_80 sm_86 sm_89 sm_90a sm_100a sm_120a"}
INTERP_TESTS=${INTERP_TESTS-"tests/test_op_references.py tests/test_gpu_faithful.py"}
versions=("$@")
[ ${#versions[@]} -eq 0 ] && read -r -a versions <<< "$TRITON_VERSIONS"

# every site directory of the project's interpreter (its own and, with
# --system-site-packages, the base interpreter's)
sites=$("$PYTHON" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))")
mkdir -p "$MATRIX_DIR" "$(dirname "$OUT")"
logs=()
own=$("$PYTHON" -c "import triton; print(triton.__version__)")
for v in "${versions[@]}"; do
    env_dir="$MATRIX_DIR/triton-$v"
    if [ "$v" = "$own" ]; then
        env_dir=$(dirname "$(dirname "$PYTHON")")     # the project's own environment has that release
    elif [ ! -x "$env_dir/bin/python" ]; then
        "$PYTHON" -m venv --without-pip "$env_dir"
        env_site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        # the project's packages after this environment's own (its triton wins)
        echo "$sites" > "$env_site/zz_project.pth"
        "$PYTHON" -m pip --python "$env_dir/bin/python" install -q --no-deps "triton==$v"
        # the interpreters of Triton 3.2-3.6 call int() on 1-element arrays, which numpy 2.4
        # refuses ("only 0-dimensional arrays can be converted"); 3.8 and 3.9 run with it
        case "$v" in 3.[0-7].*) "$PYTHON" -m pip --python "$env_dir/bin/python" install -q --no-deps "numpy<2.4" ;; esac
    fi
    got=$("$env_dir/bin/python" -c "import triton; print(triton.__version__)")
    # one gate per architecture: an older Triton may abort on an architecture it does not
    # know (a C++ assertion), which then costs only that cell
    for arch in $ARCHS; do
        echo "== triton $got $arch" >&2
        log="$MATRIX_DIR/gate-$v-$arch.json"
        rm -f "$log"
        # on Hopper also prove that the "wgmma serialized" rule sees this release's ptxas log
        probe=""
        [ "$arch" = sm_90a ] && probe="--wgmma-probe"
        # shellcheck disable=SC2086
        env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$PWD" \
            "$env_dir/bin/python" -m dft_kernels.tools.compile_check --jobs "$JOBS" --arch "$arch" --json "$log" \
            $probe $GATE_ARGS > "$MATRIX_DIR/gate-$v-$arch.md" 2> "$MATRIX_DIR/gate-$v-$arch.err" || true
        [ -s "$log" ] || "$PYTHON" - "$got" "$arch" "$MATRIX_DIR/gate-$v-$arch.err" "$log" <<'PY'
import json, sys
version, arch, err, out = sys.argv[1:]
lines = [seg.strip() for ln in open(err, errors="replace").read().splitlines() for seg in ln.split("\r")]
why = next((ln for ln in reversed(lines) if "Error" in ln or "Assertion" in ln or "error" in ln), lines[-1] if lines else "")
for mark in ("Assertion", "python: "):     # an abort: the assertion, without the progress bar before it
    if mark in why:
        why = why[why.index(mark):]
        break
json.dump({"triton": version, "arch": arch, "error": why, "summary": []}, open(out, "w"))
PY
        logs+=("$log")
    done
    if [ -n "$INTERP_TESTS" ]; then
        echo "== triton $got interpreter tests" >&2
        log="$MATRIX_DIR/interp-$v.json"
        set +e
        # shellcheck disable=SC2086
        TRITON_INTERPRET=1 "$env_dir/bin/python" -m pytest -q -p no:cacheprovider $INTERP_TESTS \
            > "$MATRIX_DIR/interp-$v.log" 2>&1
        rc=$?
        set -e
        "$PYTHON" - "$got" "$rc" "$MATRIX_DIR/interp-$v.log" "$log" "$INTERP_TESTS" <<'PY'
import json, sys
version, rc, text, out, tests = sys.argv[1:]
lines = [ln for ln in open(text, errors="replace").read().splitlines() if ln.strip()]
json.dump({"triton": version, "interpreter_tests": tests, "rc": int(rc), "summary": lines[-1] if lines else ""},
          open(out, "w"))
PY
        logs+=("$log")
    fi
done
"$PYTHON" -m dft_kernels.tools.compile_check --matrix "$OUT" "${logs[@]}"
echo "wrote $OUT" >&2
