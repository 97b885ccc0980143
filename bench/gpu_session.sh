#!/usr/bin/env bash
# One GPU session (device tool): the CUDA tests, then bench.attention --quick, then
# bench.worker_gpu, each time-boxed (about 9 minutes at most in all) so that a failing or slow
# step does not stop the rest. Everything lands under $OUT: env.txt, <step>.log, the results
# JSONs (attention_<gpu>.json + .png, worker_<gpu>.json) and cuda_tests.xml.
#
#     OUT=/some/dir bash bench/gpu_session.sh
#
# Wheels carried in build/wheels/*.whl (grpcio: memdb_worker.memory.memory imports memdb.errors, which
# imports grpc; faiss-cpu: builder.build_memory imports it on hosts of >= 4 cores, as in
# tests/test_worker_cuda.py; transformers 5.24.0 if the device's differs) are installed into
# /tmp/memdb_site first (--no-deps, no index) and put on PYTHONPATH.
set -u
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
SITE=/tmp/memdb_site
if compgen -G "build/wheels/*.whl" > /dev/null; then
    python -m pip install -q --no-deps --no-index --target "$SITE" build/wheels/*.whl \
        > "$OUT/wheels.log" 2>&1 || echo "wheel install failed (see wheels.log)"
fi
export PYTHONPATH="$ROOT:$ROOT/client:$ROOT/worker:$SITE:${PYTHONPATH:-}"
export MEMDB_VERSION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

step() {  # step NAME SECONDS COMMAND...: run time-boxed, log to $OUT/NAME.log, never abort
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (at most ${secs} s): $*"
    timeout --signal=INT --kill-after=15 "$secs" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}

step env 15 bash -c 'nvidia-smi; python -c "
import sys, torch, triton, transformers
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__,
      transformers.__version__, torch.cuda.get_device_name())
import grpc, memdb_worker.attend.fused, memdb_worker.attend.decode_step; print(\"imports ok\")"'
cp "$OUT/env.log" "$OUT/env.txt"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing more to run (see $OUT/env.txt)"
    exit 2
fi
# the new tests first: if the time box cuts the run, it cuts the suites earlier runs verified
step cuda_tests 230 python -m pytest -q -p no:cacheprovider -rfEs -k "not interpreter" \
    --junitxml="$OUT/cuda_tests.xml" \
    tests/test_worker_shared_prefix.py tests/test_worker_decode_step.py \
    tests/test_worker_fused.py tests/test_worker_cuda.py
step attention 170 python -m bench.attention --quick --out "$OUT"
step worker_gpu 120 python -m bench.worker_gpu --N 8192,32768,131072 --time-budget 60 \
    --out "$OUT/worker_$(python -c 'import torch; from bench.attention import gpu_tag; print(gpu_tag(torch.cuda.get_device_name()))' 2>/dev/null || echo gpu).json"
echo "=== session done in $SECONDS s; files in $OUT:"
ls -la "$OUT"
