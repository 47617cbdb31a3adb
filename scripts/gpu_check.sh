#!/usr/bin/env bash
# Everything GPU-side in one go, on a machine with an NVIDIA GPU and no network:
#   1. install what is missing from wheels in ./.whl (onnxruntime-gpu may come in parts:
#      .whl/parts/onnxruntime_gpu*.whl.part-*), put pip's CUDA/cuDNN/TensorRT libraries on
#      the library path, make this package importable;
#   2. export a random ImageNet-shaped model (224) and the CIFAR checkpoint (if shared data
#      is there), convert-fp16, quantize (--target tensorrt), parity on cpu+cuda(+tensorrt),
#      bench at batch 1/32/256 with --io-binding, with and without --cuda-graph;
#   3. write every result as JSON into RESULTS_DIR, plus summary.json with one record per
#      step (ok / failed / timeout / skipped). A failed step is recorded and the run goes on;
#      each step has a timeout and the whole run a budget (default 285 s).
#
# usage: scripts/gpu_check.sh RESULTS_DIR [--dry-run]
# env:   PYTHON               interpreter to use (default: python3)
#        SHARED_DIR           the shared folder (default: ./shared, else ../shared)
#        GPU_CHECK_PROVIDERS  auto (cuda, plus tensorrt when listed) | cpu (CPU smoke mode) |
#                             a comma list such as cuda,tensorrt
#        GPU_CHECK_BATCHES    bench batch sizes (default 1,32,256; CPU mode 1)
#        GPU_CHECK_ITERATIONS / GPU_CHECK_WARMUP   bench iterations (default 200 / 20)
#        GPU_CHECK_MODELS     space-separated FP32 models to use instead of exporting
#        GPU_CHECK_BUDGET_S   total time budget in seconds (default 285)
#        GPU_CHECK_WORK       where models go (default artifacts/gpu_check)
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 for bad usage.
set -uo pipefail

usage() { echo "usage: $0 RESULTS_DIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
INTERNAL=""
case $1 in __install-*) INTERNAL=$1; shift ;; esac  # re-entry for timed install steps
RESULTS=$1
DRY_RUN=0
[ "${2:-}" = "--dry-run" ] && DRY_RUN=1
[ $# -le 2 ] || usage

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$RESULTS/logs" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-$ROOT/artifacts/gpu_check}
mkdir -p "$WORK"
BUDGET=${GPU_CHECK_BUDGET_S:-285}
START=$(date +%s)
STEPS="$RESULTS/steps.tsv"
[ -n "$INTERNAL" ] || : > "$STEPS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
RD=("$PY" -m resnet_deploy)

if [ -n "${SHARED_DIR:-}" ]; then SHARED=$SHARED_DIR
elif [ -d "$ROOT/shared/data" ]; then SHARED=$ROOT/shared
else SHARED=$ROOT/../shared; fi

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" >&2; }

record() {  # name status rc seconds note (tabs/newlines in the note become spaces)
    local note=${5:-}; note=${note//$'\t'/ }; note=${note//$'\n'/ }
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$note" >> "$STEPS"
}

# step NAME TIMEOUT_S CMD...: run with a timeout (capped by what is left of the budget),
# log to RESULTS/logs/NAME.log, record the outcome, never abort the script.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ( $(date +%s) - START ) ))
    if [ "$DRY_RUN" = 1 ]; then
        echo "$name: $*"; record "$name" dry-run 0 0 "$*"; return 0
    fi
    if [ "$left" -le 5 ]; then
        log "$name: skipped, the ${BUDGET}s budget is spent"
        record "$name" skipped - 0 "budget spent"; return 1
    fi
    [ "$limit" -gt $(( left - 3 )) ] && limit=$(( left - 3 ))
    log "$name (timeout ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" > "$RESULTS/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    record "$name" "$status" "$rc" "$secs" "logs/$name.log"
    [ "$status" = ok ] || log "$name: $status (rc $rc); last lines:
$(tail -n 5 "$RESULTS/logs/$name.log")"
    [ "$status" = ok ]
}

skip() { log "$1: skipped ($2)"; record "$1" skipped - 0 "$2"; }

# --- 1. install ---------------------------------------------------------------------------

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }
ort_lists() { "$PY" -c "import onnxruntime as o, sys; sys.exit('$1' not in o.get_available_providers())" >/dev/null 2>&1; }

# The onnxruntime-gpu wheel, whole or reassembled from its parts, printed as a path.
gpu_wheel() {
    local whole
    whole=$(ls "$ROOT"/.whl/onnxruntime_gpu*.whl 2>/dev/null | head -n 1)
    if [ -n "$whole" ]; then echo "$whole"; return 0; fi
    local first
    first=$(ls "$ROOT"/.whl/parts/onnxruntime_gpu*.whl.part-* 2>/dev/null | head -n 1)
    [ -n "$first" ] || return 1
    local name=${first##*/}; name=${name%.part-*}
    mkdir -p "$WORK/wheels"
    # Parts are concatenated in natural order (part-1, part-2, ..., part-10; or aa, ab, ...).
    ls "$ROOT/.whl/parts/$name".part-* | sort -V | xargs cat > "$WORK/wheels/$name" || return 1
    "$PY" -m zipfile -t "$WORK/wheels/$name" >/dev/null || { echo "bad wheel $name" >&2; return 1; }
    echo "$WORK/wheels/$name"
}

install_onnxruntime_gpu() {
    local wheel
    wheel=$(gpu_wheel) || { echo "no onnxruntime_gpu wheel in $ROOT/.whl or .whl/parts" >&2; return 1; }
    echo "installing $wheel"
    # Both distributions own the same 'onnxruntime' package folder: remove the CPU one first.
    "$PY" -m pip uninstall -y onnxruntime || true
    "$PY" -m pip install --no-index --find-links "$ROOT/.whl" "$wheel" \
        || "$PY" -m pip install --no-deps "$wheel"
}

install_missing() {
    local missing=() pair
    for pair in onnx:onnx onnxsim:onnxsim onnxslim:onnxslim onnxscript:onnxscript \
                click:click PIL:pillow numpy:numpy matplotlib:matplotlib; do
        has_module "${pair%%:*}" || missing+=("${pair##*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing: ${missing[*]}"
        "$PY" -m pip install --no-index --find-links "$ROOT/.whl" "${missing[@]}" || return 1
    fi
    local here
    here=$("$PY" -c "import resnet_deploy, os; print(os.path.dirname(os.path.dirname(resnet_deploy.__file__)))" 2>/dev/null)
    if [ "$here" != "$ROOT" ]; then
        "$PY" -m pip install --no-deps --no-build-isolation -e "$ROOT" \
            || echo "editable install failed; using PYTHONPATH=$ROOT"
    fi
    "$PY" -c "import resnet_deploy.cli"
}

# pip's nvidia-* and tensorrt packages ship the CUDA/cuDNN/TensorRT shared libraries that
# onnxruntime-gpu loads with dlopen: put their folders on the library path.
lib_path=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for root in roots:
    dirs += glob.glob(os.path.join(root, "nvidia", "*", "lib"))
    dirs += glob.glob(os.path.join(root, "nvidia", "cu*", "lib"))
    dirs += glob.glob(os.path.join(root, "tensorrt_libs"))
    dirs += glob.glob(os.path.join(root, "torch", "lib"))
print(":".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))
EOF
)
[ -n "$lib_path" ] && export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ -n "$INTERNAL" ]; then  # we are the child of a timed install step
    case $INTERNAL in
        __install-onnxruntime-gpu) install_onnxruntime_gpu ;;
        __install-deps) install_missing ;;
        *) usage ;;
    esac
    exit $?
fi

MODE=${GPU_CHECK_PROVIDERS:-auto}
step env 30 bash -c "nvidia-smi || true; '$PY' --version; '$PY' -m pip list 2>/dev/null | grep -iE 'onnx|torch|nvidia|tensorrt|numpy' || true; echo LD_LIBRARY_PATH=\$LD_LIBRARY_PATH"
if [ "$MODE" != cpu ]; then
    if ort_lists CUDAExecutionProvider; then
        skip install-onnxruntime-gpu "this onnxruntime already lists CUDAExecutionProvider"
    else
        # timeout(1) runs programs, not shell functions: re-enter this script for the step.
        step install-onnxruntime-gpu 150 bash "$ROOT/scripts/gpu_check.sh" __install-onnxruntime-gpu "$RESULTS"
    fi
fi
step install-deps 120 bash "$ROOT/scripts/gpu_check.sh" __install-deps "$RESULTS"

case $MODE in
    auto)
        PROVIDERS=()
        ort_lists CUDAExecutionProvider && PROVIDERS+=(cuda)
        ort_lists TensorrtExecutionProvider && PROVIDERS+=(tensorrt)
        [ "$DRY_RUN" = 1 ] && PROVIDERS=(cuda tensorrt)
        [ ${#PROVIDERS[@]} -gt 0 ] || log "no CUDA provider: the GPU steps are skipped" ;;
    cpu) PROVIDERS=() ;;
    *) IFS=, read -r -a PROVIDERS <<< "$MODE" ;;
esac
PARITY_PROVIDERS=$(IFS=,; echo "cpu${PROVIDERS[*]:+,${PROVIDERS[*]}}")
if [ "$MODE" = cpu ]; then
    BATCHES=${GPU_CHECK_BATCHES:-1}; ITER=${GPU_CHECK_ITERATIONS:-20}; WARM=${GPU_CHECK_WARMUP:-2}
else
    BATCHES=${GPU_CHECK_BATCHES:-1,32,256}; ITER=${GPU_CHECK_ITERATIONS:-200}
    WARM=${GPU_CHECK_WARMUP:-20}
fi
log "providers: ${PROVIDERS[*]:-none (CPU smoke mode)}; parity on $PARITY_PROVIDERS; batches $BATCHES"

# --- 2. models ----------------------------------------------------------------------------

CKPT=$SHARED/data/cifar10-resnet18/resnet18_cifar10_64.pth
declare -a NAMES=() FP32=() WEIGHTS=() CALIB=() IMAGES=()
if [ -n "${GPU_CHECK_MODELS:-}" ]; then
    for m in $GPU_CHECK_MODELS; do
        NAMES+=("$(basename "${m%.onnx}")"); FP32+=("$m"); WEIGHTS+=(""); CALIB+=("$ROOT/calibration"); IMAGES+=("$ROOT/calibration")
    done
else
    if step export-r224 120 "${RD[@]}" export --weights random --parity-images "$ROOT/calibration" \
            -o "$WORK/r224.onnx" --json "$RESULTS/export-r224.json"; then
        calib=$ROOT/calibration; [ -d "$SHARED/data/imagenet-samples" ] && calib=$SHARED/data/imagenet-samples
        NAMES+=(r224); FP32+=("$WORK/r224.onnx"); WEIGHTS+=(random); CALIB+=("$calib"); IMAGES+=("$calib")
    fi
    if [ -f "$CKPT" ]; then
        if step export-cifar 120 "${RD[@]}" export --weights "$CKPT" --input-size 64 --resize-size 73 \
                --parity-images "$ROOT/calibration" -o "$WORK/cifar.onnx" \
                --json "$RESULTS/export-cifar.json"; then
            NAMES+=(cifar); FP32+=("$WORK/cifar.onnx"); WEIGHTS+=("$CKPT")
            CALIB+=("$SHARED/data/cifar10-calib"); IMAGES+=("$SHARED/data/cifar10-dev")
        fi
    else
        skip export-cifar "no CIFAR checkpoint at $CKPT (set SHARED_DIR)"
    fi
fi

HAVE_QUANTIZE=0
"${RD[@]}" quantize --help >/dev/null 2>&1 && HAVE_QUANTIZE=1
HAVE_LIMIT=0
"${RD[@]}" parity --help 2>/dev/null | grep -q -- "--limit" && HAVE_LIMIT=1
# CPU smoke mode keeps the quantize calibration tiny; on the GPU machine 16 cores make 64 quick.
NSAMPLES=64; [ "$MODE" = cpu ] && NSAMPLES=4

declare -a SETS=()
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} fp32=${FP32[$i]}
    models=("$fp32")
    step "fp16-$name" 90 "${RD[@]}" convert-fp16 "$fp32" -o "$WORK/$name.fp16.onnx" \
        --json "$RESULTS/fp16-$name.json" && models+=("$WORK/$name.fp16.onnx")
    if [ "$HAVE_QUANTIZE" = 1 ] || [ "$DRY_RUN" = 1 ]; then
        target=tensorrt; [ "$MODE" = cpu ] && target=cpu
        step "quantize-$name" 120 "${RD[@]}" quantize --model "$fp32" --calibration "${CALIB[$i]}" \
            --target "$target" --num-samples "$NSAMPLES" -o "$WORK/$name.int8.onnx" \
            --json "$RESULTS/quantize-$name.json" && models+=("$WORK/$name.int8.onnx")
    else
        skip "quantize-$name" "this checkout has no 'resnet-deploy quantize' command"
    fi
    SETS+=("$name|${WEIGHTS[$i]}|${IMAGES[$i]}|${models[*]}")
done

# --- 3. parity and bench --------------------------------------------------------------------

for set in "${SETS[@]}"; do
    IFS='|' read -r name weights images model_list <<< "$set"
    read -r -a models <<< "$model_list"
    margs=(); for m in "${models[@]}"; do margs+=(--model "$m"); done
    wargs=(); [ -n "$weights" ] && wargs=(--weights "$weights")
    largs=(); [ "$HAVE_LIMIT" = 1 ] && largs=(--limit 256)
    step "parity-$name" 150 "${RD[@]}" parity "${margs[@]}" "${wargs[@]}" \
        --providers "$PARITY_PROVIDERS" --images "$images" "${largs[@]}" --skip-unavailable \
        --json "$RESULTS/parity-$name.json"
done

bench() {  # name provider graph(0|1) extra-args...
    local name=$1 provider=$2 graph=$3; shift 3
    local set margs=() gargs=() tag=$provider
    for set in "${SETS[@]}"; do
        [ "${set%%|*}" = "$name" ] || continue
        IFS='|' read -r _ _ _ model_list <<< "$set"
        for m in $model_list; do
            # ORT refuses a CUDA graph unless every node is on CUDA, and the CUDA EP runs
            # some QDQ nodes on CPU: INT8 takes part in CUDA graphs through TensorRT only.
            [ "$graph$provider" = 1cuda ] && [ "${m%.int8.onnx}" != "$m" ] && continue
            margs+=(--model "$m")
        done
    done
    [ ${#margs[@]} -gt 0 ] || { skip "bench-$name-$tag" "no models"; return; }
    if [ "$graph" = 1 ]; then gargs=(--cuda-graph); tag=$provider-graph; fi
    step "bench-$name-$tag" 150 "${RD[@]}" bench "${margs[@]}" --provider "$provider" \
        --batch-size "$BATCHES" --warmup "$WARM" --iterations "$ITER" --io-binding "${gargs[@]}" \
        --trt-cache "$ROOT/artifacts/trt_cache" "$@" \
        --json "$RESULTS/bench-$name-$tag.json" --markdown "$RESULTS/bench-$name-$tag.md"
}

if [ ${#PROVIDERS[@]} -eq 0 ]; then
    for set in "${SETS[@]}"; do bench "${set%%|*}" cpu 0 --torch; done
    skip bench-gpu "no CUDA provider in this onnxruntime (GPU_CHECK_PROVIDERS=$MODE)"
else
    # CUDA first (the cheap, essential figures); TensorRT last, since its engine builds are
    # the slowest part and the budget then cuts only them.
    for provider in "${PROVIDERS[@]}"; do
        for set in "${SETS[@]}"; do
            name=${set%%|*}
            if [ "$provider" = cuda ]; then bench "$name" cuda 0 --torch; else bench "$name" "$provider" 0; fi
            bench "$name" "$provider" 1
        done
    done
fi

# --- summary --------------------------------------------------------------------------------

"$PY" - "$STEPS" "$RESULTS/summary.json" "$(( $(date +%s) - START ))" "$MODE" \
    "${PROVIDERS[*]:-}" <<'EOF'
import json, sys
steps_file, out, seconds, mode, providers = sys.argv[1:6]
steps = []
for line in open(steps_file, encoding="utf-8"):
    name, status, rc, secs, note = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "status": status, "rc": None if rc == "-" else int(rc),
                  "seconds": float(secs), "note": note})
summary = {"mode": mode, "providers": providers.split(), "seconds": int(seconds),
           "passed": all(s["status"] in ("ok", "skipped", "dry-run") for s in steps),
           "counts": {k: sum(s["status"] == k for s in steps)
                      for k in ("ok", "failed", "timeout", "skipped", "dry-run")},
           "steps": steps}
with open(out, "w", encoding="utf-8") as fh:
    json.dump(summary, fh, indent=2)
print(f"summary: {summary['counts']} in {seconds}s -> {out}")
sys.exit(0 if summary["passed"] else 1)
EOF
