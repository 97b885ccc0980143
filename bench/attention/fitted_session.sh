#!/usr/bin/env bash
# One GPU call (device tool) for the fitted-row kernels: their CUDA tests (with the shared-prefix
# and fused tests that share their live programs), then `python -m bench.attention --fitted`,
# each time-boxed so that a failing step does not stop the rest; logs and the JSON under $OUT.
#
#     MEMDB_VERSION=<commit> OUT=/some/dir bash bench/attention/fitted_session.sh
#
# grpcio (memdb.errors imports grpc) travels as a wheel in .whl/ (git-ignored, carried).
set -u
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1 || echo "wheel install failed"
fi
export PYTHONPATH="$PWD:$PWD/client:$PWD/worker:/tmp/site:${PYTHONPATH:-}"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"

step() {  # step NAME SECONDS COMMAND...: time-boxed, logged to $OUT/NAME.log, never aborts
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
    tail -n "${TAIL:-8}" "$OUT/$name.log"
}

step tests ${TESTS_S:-180} python3 -m pytest -q -p no:cacheprovider -x \
    tests/test_worker_fitted_kernel.py tests/test_worker_shared_prefix.py \
    tests/test_worker_fused.py -k "cuda and not compact and not lse_correction"
TAIL=60 step bench ${BENCH_S:-330} python3 -m bench.attention --fitted --out "$OUT" ${BENCH_ARGS:-}
