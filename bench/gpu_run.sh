#!/usr/bin/env bash
# The prepared GPU run for issue #3: one device call on a lent CUDA machine (an H200 host).
#
#   bash bench/gpu_wheels.sh                      # here, once (.whl/, git-ignored)
#   device run, carry [".whl"], timeout_s 540:    bash bench/gpu_run.sh env compiled tests
#   at once (warm 30 s), timeout_s 420:           bash bench/gpu_run.sh eager train
#
# The issue's key figure (the compiled model stage) comes first: a session's 15 device
# minutes include the machine's start, and the compiled step alone also gives the eager
# references, both paths and how busy the decode processes were.
#
# Steps, in the order given (default: env tests eager train, ~4 minutes; `compiled` takes
# ~4–5: DenseNet-169 compiles twice, ~90 s each (FACTS.md), the worker's graph and the bare
# model's static one; a graph compiled before on the machine comes from inductor's cache in
# /tmp, and the compiled step's output says which):
#   env       the machine: GPU, CPU, Python, torch; every module the run needs imports
#   tests     the CUDA tests (tests/test_model.py -k cuda, the compiled one included)
#   eager     python -m bench.scoring on CUDA, bf16 + channels_last, batch 256, with the
#             decode processes of a 16-core host: views/s of the path, the worker's model stage
#             alone, the bare model, and the CPU table (how many decode processes one worker
#             process feeds); then the overlay path as 3 `triage worker` processes sharing
#             those decode processes (README, "Sizing a GPU host"); last, how busy the
#             decode processes were (near 100 %: decoding is the limit, the issue's aim)
#   compiled  the same with --compile: the worker's model through torch.compile (the
#             issue's 12,000 img/s target is its model stage alone: staging, copy, forward
#             and CAM as the worker's batch loop runs them, one batch in flight),
#             beside the bare model compiled with static shapes
#   train     python -m bench.train_gpu: the MURA recipe's training images/s
# Each step has a time limit, so one that hangs leaves the others' results; each writes
# $OUT/<step>.txt (the device tool brings $OUT back; here: bench/out/gpu/).
#
# GPU_RUN_DEVICE=cpu with small SCORING_ARGS / TRAIN_ARGS runs the same steps on a CPU
# (tests/test_gpu_run.py): the script and the wheel set are checked before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-bench/out/gpu}
mkdir -p "$out"
device=${GPU_RUN_DEVICE:-cuda}
py=${PYTHON:-python3}
scoring_args=${SCORING_ARGS:---precision bf16 --batch 256 --studies 1000 --views 2 --size-mb 2 --decode-processes 14 --worker-processes 3 --reps 2}
train_args=${TRAIN_ARGS:---device $device}
export PYTHONUNBUFFERED=1

wheels=${GPU_RUN_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=${GPU_RUN_SITE:-/tmp/site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl || { echo "cannot install $wheels/ into $site" >&2; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

failed=0
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* (limit ${limit} s, started $(date -u +%T))"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
  local status=$?
  echo "=== $name: exit status $status" >>"$out/$name.txt"
  # The tables are at the end; the whole log is in $out.
  tail -n 40 "$out/$name.txt"
  [ "$status" -eq 0 ] || failed=1
}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  lscpu | grep -E 'Model name|^CPU\(s\)' || true
  "$py" - "$device" <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
for name in ("triage.daemon", "triage.scoring.worker", "triage.dicom.sr", "triage.dicom.sc",
             "triage.cli.main", "triage.training.train", "bench.scoring", "bench.train_gpu"):
    importlib.import_module(name)
print("every module imports")
sys.exit(0 if sys.argv[1] == "cpu" or torch.cuda.is_available() else "no CUDA device")
EOF
}

export -f environment
export py device
steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(env tests eager train)
for name in "${steps[@]}"; do
  case $name in
    env) step env 60 bash -c environment ;;
    tests) step tests 300 "$py" -m pytest -q -p no:cacheprovider tests/test_model.py -k cuda ;;
    # shellcheck disable=SC2086  # the argument lists are meant to split
    eager) step eager 300 "$py" -m bench.scoring --device "$device" $scoring_args ;;
    # shellcheck disable=SC2086
    # One worker process: several would each compile their own model.
    compiled) step compiled 420 "$py" -m bench.scoring --device "$device" --compile $scoring_args --worker-processes 1 ;;
    # shellcheck disable=SC2086
    train) step train 180 "$py" -m bench.train_gpu $train_args --json "$out/train.json" ;;
    *) echo "unknown step: $name (env, tests, eager, compiled, train)" >&2; exit 2 ;;
  esac
done
exit "$failed"
