#!/usr/bin/env bash
# Every GPU measurement the open issues (3, 4) still need, in as few device calls as possible.
#
# A GPU session's device time is short (30 minutes, 10 per command), so this runs named stages, each under its
# own time limit, keeps going when one fails, and stops starting stages when the call's budget
# (GPU_SESSION_BUDGET seconds, default 540: under the device tool's 600 s limit) runs out. After every stage it
# re-packs everything so far into $OUT/gpu-results.tar.gz, so a call cut short still brings back what it measured.
#
# On the GPU machine torch, triton, pytest and pytest-benchmark are installed; DALI and the datasets are not: pack
# them here with ../shared/tools/gpu-pack.sh and unpack them there as it prints (to /tmp/gpu). A machine left idle
# for 30 s is given back and the next call starts bare, without /tmp/gpu: make the unpacking calls and these calls
# back to back, and unpack again if a call reports "FASTCNN_DATA is unset". Then, one stage list per call, e.g.
#
#   bash bench/gpu_session.sh install tests                # GPU correctness first
#   bash bench/gpu_session.sh install kernels              # kernel benchmarks and the issue-3 verdicts
#   bash bench/gpu_session.sh install epoch                # issue 4's targets: epoch times, 100x, accuracy
#   bash bench/gpu_session.sh install variants             # the fast preset less one choice at a time
#   bash bench/gpu_session.sh install ablation             # what each optimization buys (compiles a lot)
#   bash bench/gpu_session.sh install ddp                  # DDP + CUDA graphs against one process
#
# That is about 30 minutes of device time with the transfers; in that order, the most needed come first.
#
# (install again in each call: a machine given back in between starts bare.) Stages:
#   install   pip install -e . without touching torch; `fastcnn env`
#   tests     the GPU-marked tests, then the kernel/accelerate tests on CUDA tensors, with compiled kernels
#             (TRITON_INTERPRET=0)
#   kernels   bench/test_bench_conv_relu_pool.py: first issue 3's target cell (SimpleCNN's layer, batch 512, bf16:
#             fused vs cuDNN vs torch.compile max-autotune, and peak memory) with bench/kernel_report.py's verdicts,
#             then fused vs cuDNN for every layer, batch and dtype
#   ablation  fastcnn bench --ablation at batch 64 and 512 (images/s, speed-ups, peak memory, chart)
#   epoch     fastcnn bench --ablation --epoch at batch 64 (the tutorial program, then one optimization at a time,
#             and DALI: full MNIST epochs with test accuracy; this also shows each optimization's contribution,
#             so the step-mode ablation stage can wait), then the fast configurations at batch 512: issue 4's
#             <= 60 ms / <= 15 ms, >= 100x and 0.3-point targets
#   variants  the fast preset against itself less one choice (autocast, channels-last, auto's kernel choice, the
#             fused optimizer) in batch-64 MNIST epochs, 3 interleaved rounds; then, in a process of its own (the
#             profiler and CUDA graphs have crashed together on some CUDA versions), 20 profiled steps of the eager
#             and graphed lines and of the variants: kernels, host launches and GPU busy time per step, what to cut
#             if the 60 ms epoch is missed
#   ddp       fastcnn train --nproc 1 --cuda-graph against the same run in one process
# Results land in $OUT/gpu-results.tar.gz (the device tool brings back at most 8 files) and the log in
# $OUT/gpu-session.log; copy the JSON/PNG files worth keeping into bench/results/ as gpu-<device>-*.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-out}
work=$(mktemp -d)/gpu-results
budget=${GPU_SESSION_BUDGET:-540}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if [ -z "${FASTCNN_DATA:-}" ] && [ -d /tmp/gpu/data ]; then export FASTCNN_DATA=/tmp/gpu/data; fi
py=${PYTHON:-python3}
log="$out/gpu-session.log"
gpu=$($py -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(n.split()[1].lower() if n.startswith('NVIDIA ') else n.split()[0].lower())" 2>/dev/null || echo unknown)

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$log"; }

# stage NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the call's budget), log everything,
# record the verdict, re-pack the results, never abort the script.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS - 25))
  if [ "$left" -lt 20 ]; then
    say "stage $name: skipped, the call's budget of ${budget}s is spent"
    echo "$name skipped=budget" >> "$work/stages.txt"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "stage $name (limit ${limit}s): $*"
  local started=$SECONDS
  # --kill-after beyond torchrun's own 30 s grace for its workers (they run in sessions of their own).
  timeout --signal=INT --kill-after=45 "$limit" "$@" 2>&1 | tee -a "$log" "$work/$name.log" >/dev/null
  local rc=${PIPESTATUS[0]}
  say "stage $name: exit $rc after $((SECONDS - started)) s"
  echo "$name exit=$rc seconds=$((SECONDS - started))" >> "$work/stages.txt"
  pack
  return 0
}

pack() { tar -C "$(dirname "$work")" -czf "$out/gpu-results.tar.gz.tmp" gpu-results && \
  mv "$out/gpu-results.tar.gz.tmp" "$out/gpu-results.tar.gz"; }

fastcnn=("$py" -m fastcnn)
# pytest-timeout is on the GPU image; elsewhere run without per-test limits.
per_test_limit=()
$py -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout 240)

run_install() {
  stage install 180 $py -m pip install -q --no-deps --no-build-isolation -e .
  stage env 60 "${fastcnn[@]}" env
  $py -c "import nvidia.dali" 2>/dev/null || say "DALI is not importable: the dali lines will be skipped"
  [ -n "${FASTCNN_DATA:-}" ] || say "FASTCNN_DATA is unset and /tmp/gpu/data is missing: MNIST stages will fail"
}

run_tests() {
  # GPU-only tests first (CUDA graphs, DDP, DALI GPU, kernel choice), then the kernel and accelerate tests, which
  # run on CUDA tensors when a GPU is visible; the other tests are CPU tests that CI runs anyway.
  stage gpu-tests 300 $py -m pytest -q -p no:cacheprovider "${per_test_limit[@]}" -m gpu tests \
    --junitxml="$work/gpu-tests.xml" -rs
  # FASTCNN_AUTOTUNE=0: one config per kernel instead of autotuning each of the ~130 test shapes (seconds each);
  # test_kernel_configs.py runs every config explicitly.
  FASTCNN_AUTOTUNE=0 stage kernel-tests 300 $py -m pytest -q -p no:cacheprovider "${per_test_limit[@]}" -m "not gpu" \
    tests/test_conv_relu_pool.py tests/test_kernel_configs.py tests/test_accelerate.py tests/test_kernel_choice.py \
    tests/test_cuda_graph.py \
    --junitxml="$work/kernel-tests.xml" -rs
}

run_kernels() {
  # Issue 3's target cell first (SimpleCNN's layer, batch 512, bf16: fused, cuDNN and max-autotune, forward and
  # forward+backward, and the training step's memory), with its verdicts; then fused against cuDNN everywhere.
  # max-autotune compiles take most of the time, so only the target cell has them.
  local target="$work/gpu-$gpu-kernels-target.json" all="$work/gpu-$gpu-kernels.json"
  local timing=(--benchmark-max-time=0.3 --benchmark-min-rounds=20)
  stage kernels-target 240 $py -m pytest -q -p no:cacheprovider bench/test_bench_conv_relu_pool.py \
    -k "simplecnn and 512 and bf16" --benchmark-json="$target" "${timing[@]}"
  [ -f "$target" ] && stage kernel-report-target 60 $py bench/kernel_report.py "$target" \
    --json "$work/gpu-$gpu-kernel-target-summary.json"
  stage kernels-all 300 $py -m pytest -q -p no:cacheprovider bench/test_bench_conv_relu_pool.py \
    -k "not max_autotune and not (simplecnn and 512 and bf16)" --benchmark-json="$all" "${timing[@]}"
  [ -f "$all" ] && stage kernel-report-all 60 $py bench/kernel_report.py "$all" --json "$work/gpu-$gpu-kernel-summary.json"
}

run_ablation() {
  for batch in 64 512; do
    stage "ablation-b$batch" 240 "${fastcnn[@]}" bench --ablation --dataset mnist -b "$batch" \
      --json "$work/gpu-$gpu-ablation-b$batch.json" --plot "$work/gpu-$gpu-ablation-b$batch.png"
  done
}

run_epoch() {
  # The whole ablation in epoch mode at the tutorial's batch: each optimization's contribution in real MNIST
  # epochs with test accuracy, the tutorial program as the reference (the 100x and 0.3-point targets), and the
  # 60 ms epoch; every line is logged as it is measured and an interrupted run keeps what it measured. Then the
  # 15 ms target at batch 512, interleaved over 3 rounds.
  stage epoch-b64 360 "${fastcnn[@]}" bench --ablation --epoch --dataset mnist -b 64 --repeats 1 \
    --json "$work/gpu-$gpu-epoch-b64.json" --plot "$work/gpu-$gpu-epoch-b64.png"
  stage epoch-b512 150 "${fastcnn[@]}" bench --epoch --dataset mnist -b 512 --repeats 3 --configs fast,fused,cuda-graph \
    --json "$work/gpu-$gpu-epoch-b512.json"
}

run_variants() {
  stage variants-b64 300 "${fastcnn[@]}" bench --epoch --dataset mnist -b 64 --repeats 3 \
    --configs fast,fast-fp32,fast-nchw,fast-cudnn,fast-default-opt --json "$work/gpu-$gpu-variants-b64.json"
  stage profile-b64 180 "${fastcnn[@]}" bench --dataset mnist -b 64 --steps 20 --warmup 5 --repeats 1 --profile 20 \
    --configs fused-opt,cuda-graph,fast,fast-fp32,fast-nchw --json "$work/gpu-$gpu-profile-b64.json"
}

run_ddp() {
  local common=(train --dataset mnist -b 512 --epochs 2 --cuda-graph --no-progress --seed 0)
  stage ddp-single 180 "${fastcnn[@]}" "${common[@]}" --output "$work/ddp-single"
  stage ddp-nproc1 240 "${fastcnn[@]}" "${common[@]}" --nproc 1 --output "$work/ddp-nproc1"
  $py - "$work" <<'EOF' 2>&1 | tee -a "$log" "$work/ddp-compare.txt"
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
runs = {name: work / name / "summary.json" for name in ("ddp-single", "ddp-nproc1")}
found = {name: json.loads(path.read_text()) for name, path in runs.items() if path.exists()}
for name, summary in found.items():
    print(f"{name}: test acc {summary['test_acc']:.2f}% in {summary['train_seconds']:.3f} s "
          f"({summary.get('distributed')})")
if len(found) == 2:
    gap = abs(found["ddp-single"]["test_acc"] - found["ddp-nproc1"]["test_acc"])
    print(f"DDP + CUDA graphs vs one process: accuracy gap {gap:.2f} points")
EOF
}

say "device: $gpu; stages: $*; data: ${FASTCNN_DATA:-none}; commit $(git rev-parse --short HEAD 2>/dev/null)"
for name in "$@"; do
  case $name in
    install|tests|kernels|ablation|epoch|variants|ddp) "run_$name" ;;
    *) say "unknown stage $name (choose from install tests kernels ablation epoch variants ddp)"; pack; exit 2 ;;
  esac
done
pack
say "done: $(cat "$work/stages.txt" 2>/dev/null | tr '\n' ';')"
