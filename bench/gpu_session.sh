#!/usr/bin/env bash
# fastcnn's GPU measurements, prepared for a lease of the GPU machine (one H100 or H200). A lease is 15 minutes of
# device time in all (the machine's start, 1-2 minutes, every command and every idle wait counted; at most 10
# minutes a command), so the plan is one start and two commands back to back:
#
#   1. here, just before the lease:   bash bench/gpu_session.sh prepare
#        copies MNIST's four .gz files (12 MB) into the git-ignored .gpu/data/MNIST/raw/ (../shared/tools/gpu-pack.sh)
#        and the commit into .gpu/commit: the copy of the tree that travels has no .git.
#   2. the device tool:  run  command="bash bench/gpu_session.sh lease"   carry=[".gpu"]  timeout_s=450
#   3. at once when 2 returns (a machine idle for 30 s is given back), if status says warm and budget_left_s >= 270:
#                        run  command="bash bench/gpu_session.sh lease2"  carry=[".gpu"]  timeout_s=240
#      then give_back. On a fresh machine (warm false) skip 3: another start costs 1-2 minutes more.
#
# Start (about 120 s) + 450 + 240 = 810 s of the 900; the rest covers the transfers and the gap between the calls.
# Each command stops starting stages when its budget (GPU_SESSION_BUDGET: 420 s for lease, 210 for lease2) runs out
# and ends within it, inside its timeout_s.
#
# lease, about 7 minutes, the headline first:
#   install             pip install --no-deps -e . (torch untouched), `fastcnn env` (also as gpu-<device>-env.json)
#   cuda-kernel-tests   tests/test_conv_relu_pool.py on CUDA: the fused kernel's forward and every gradient against
#                       the aten chain (fp32, fp16, bf16; NCHW and channels-last; the models' layers' channels and
#                       kernel sizes, on small images), 45 s at most
#   cuda-graph-tests    graph-replayed steps and epochs equal eager ones, 15 s at most (both test stages with
#                       FASTCNN_AUTOTUNE=0: one kernel config instead of autotuning every test shape)
#   epoch-b64           MNIST epochs at batch 64: `reference` (the tutorial program) and `fast`, test accuracy on each
#   epoch-b512          `fast` at batch 512
#   epoch-cudnn-b64     `fast-aten` at batch 64: the fast preset with the aten chain (cuDNN on a GPU), what the fused kernel buys
#   kernel-cell         SimpleCNN's layer, batch 512, bf16: fused vs cuDNN vs torch.compile (max-autotune) forward +
#                       backward time, and a training step's peak memory, fused vs cuDNN; kernel-cell-report: ratios
#   epoch-ablation-b64  if time is left: the ablation in MNIST epochs at batch 64 (one optimization at a time)
#   profile-fast-b64    if time is left: 20 profiled steps of `fast` (kernels, host launches, GPU busy time per step)
# lease2, about 4 minutes, what lease did not reach: install again, then each stage of lease that the budget or a
# time limit cut on this machine (lease records its verdicts in $GPU_SESSION_STATE, a folder under /tmp), then
# epoch-ablation-b64 and profile-fast-b64 unless done, then
#   cuda-tests-more     the other CUDA tests: random shapes, opcheck, every kernel config, graphs with torch.compile,
#                       kernel choice measured on the GPU
#   kernels-all         fused vs cuDNN for every layer, batch and dtype (no max-autotune); kernels-all-report
# On a fresh machine lease2 finds no record of lease and runs only its own stages.
#
# Any stage above (or group: install tests kernels ablation epoch variants ddp) runs alone by name, e.g.
# `bash bench/gpu_session.sh install epoch-b512`; the groups: tests = every GPU-marked test, then the kernel tests on
# CUDA; kernels = kernel-cell, kernels-all; ablation = step-mode ablation at batch 64 and 512; epoch = the epoch
# stages of lease; variants = the fast preset less one choice at a time, then profiled; ddp = --nproc 1 against
# one process.
#
# Without CUDA (CI, the CPU machine) the same commands run in about a minute: the CUDA-only stages and the epoch
# ablation are skipped with their reason, the epoch stages train on a 2048-image subset (a check of the script, not a
# measurement). Data: .gpu/data when it exists (its .gz files unpacked here if not yet; on a machine without CUDA
# what this run unpacked is removed at the end, since unpacked MNIST would not fit the 64 MiB a command carries),
# else $FASTCNN_DATA. DALI is not on the GPU machine (its wheels, about 300 MB, cannot travel in a lease): the dali
# lines skip with that reason.
#
# Results: one line per stage in stages.txt ("NAME exit=N seconds=S" or "NAME skipped=WHY"), every stage's log, and
# the result files gpu-<device>-*.json|png (each with its command, device, versions and git commit; files written
# by pytest-benchmark or this script get them under "fastcnn_session"), re-packed after every stage into
# $OUT/gpu-results.tar.gz, so a call cut short still brings back what it measured; the whole log in
# $OUT/gpu-session.log and gpu-<device>-session.json beside it. Copy the results worth keeping into bench/results/.
# Settings: OUT (default /tmp/fastcnn-gpu-out), GPU_SESSION_BUDGET, GPU_SESSION_STATE (default
# /tmp/fastcnn-gpu-session), PYTHON (default python3, or the checkout's .venv/bin/python where there is one).
set -uo pipefail
cd "$(dirname "$0")/.."
# The GPU machine's python3 holds torch; here, the checkout's .venv when there is one.
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=$PWD/.venv/bin/python

if [ "${1:-}" = prepare ]; then
  tool=${GPU_PACK:-../shared/tools/gpu-pack.sh}
  [ -f "$tool" ] || { echo "prepare: $tool not found (set GPU_PACK to gpu-pack.sh)" >&2; exit 1; }
  bash "$tool" "${@:2}" || exit 1
  commit=$(git rev-parse HEAD) || exit 1
  [ -n "$(git status --porcelain --untracked-files=no)" ] && commit+=-dirty
  echo "$commit" > .gpu/commit
  echo "commit $commit in .gpu/commit; next, with the device tool: bash bench/gpu_session.sh lease (carry .gpu)"
  exit 0
fi

case ${1:-} in lease) default_budget=420 ;; lease2) default_budget=210 ;; *) default_budget=540 ;; esac
budget=${GPU_SESSION_BUDGET:-$default_budget}
out=${OUT:-${TMPDIR:-/tmp}/fastcnn-gpu-out}
state=${GPU_SESSION_STATE:-${TMPDIR:-/tmp}/fastcnn-gpu-session}
state_on=
work=$(mktemp -d)/gpu-results
mkdir -p "$out" "$work"
log="$out/gpu-session.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$log"; }

read -r cuda gpu < <($py -c "import torch
if torch.cuda.is_available():
    words = torch.cuda.get_device_name().split()
    print(1, (words[1] if words[0] == 'NVIDIA' and len(words) > 1 else words[0]).lower())
else:
    print(0, 'cpu')" 2>/dev/null) || true
cuda=${cuda:-0}
gpu=$(printf %s "${gpu:-unknown}" | tr -cd 'a-z0-9.-')

unpacked=()
if [ -d .gpu/data ]; then
  for gz in .gpu/data/*/raw/*.gz; do
    [ -f "$gz" ] || continue
    raw=${gz%.gz}
    [ -s "$raw" ] && continue
    if gunzip -c "$gz" > "$raw.part" && mv "$raw.part" "$raw"; then unpacked+=("$raw"); else
      rm -f "$raw.part"; say "could not unpack $gz"; fi
  done
  [ ${#unpacked[@]} -gt 0 ] && say "unpacked ${#unpacked[@]} files under .gpu/data"
  export FASTCNN_DATA=$PWD/.gpu/data
fi
cleanup() {
  if [ "$cuda" != 1 ] && [ ${#unpacked[@]} -gt 0 ]; then
    rm -f "${unpacked[@]}"
    say "removed the ${#unpacked[@]} files unpacked under .gpu/data (only the .gz files should travel)"
  fi
}
trap cleanup EXIT

# The commit: git's, or, in a copy of the tree without .git, the one `prepare` wrote (bench JSON reads it from
# FASTCNN_GIT_COMMIT).
commit=
if [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$PWD" ]; then
  commit=$(git rev-parse HEAD)
  [ -n "$(git status --porcelain --untracked-files=no)" ] && commit+=-dirty
elif [ -s .gpu/commit ]; then
  commit=$(cat .gpu/commit)
  export FASTCNN_GIT_COMMIT=$commit
fi

# Provenance: gpu-<device>-session.json (command, device, versions, commit, every stage's verdict), and the same
# facts under "fastcnn_session" in result files whose writer does not record them.
meta="$(dirname "$work")/meta.py"
cat > "$meta" <<'EOF'
import datetime, json, os, pathlib, sys

work, device = pathlib.Path(os.environ["GS_WORK"]), os.environ["GS_DEVICE"]
if sys.argv[1] == "env":  # `fastcnn env` in the log, `fastcnn env --json` in gpu-<device>-env.json
    sys.path.insert(0, os.getcwd())  # the checkout's fastcnn, as `python -m fastcnn` imports it
    from fastcnn import env_report

    info = env_report.collect()
    print(env_report.format_report(info))
    (work / f"gpu-{device}-env.json").write_text(json.dumps(info, indent=2) + "\n")
    sys.exit()
try:
    env = json.loads((work / f"gpu-{device}-env.json").read_text())
except (OSError, ValueError):
    env = {}
devices = env.get("devices", {})
facts = dict(command=os.environ["GS_COMMAND"], device=device,
             device_name=devices.get("cuda:0") or devices.get("cpu"), versions=env.get("versions"),
             git_commit=env.get("git_commit") or os.environ["GS_COMMIT"] or None)


def write(path, doc):
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(part, path)


if sys.argv[1] == "session":
    stages = []
    verdicts = work / "stages.txt"
    for line in verdicts.read_text().splitlines() if verdicts.exists() else []:
        name, _, rest = line.partition(" ")
        entry = {"stage": name}
        if rest.startswith("skipped="):
            key, _, why = rest[len("skipped="):].partition(" ")
            entry.update(skipped=key, why=why.strip("()") or None)
        else:
            entry.update((k, int(v)) for k, _, v in (item.partition("=") for item in rest.split()))
        stages.append(entry)
    write(work / f"gpu-{device}-session.json",
          dict(facts, budget_seconds=int(os.environ["GS_BUDGET"]), data=os.environ.get("FASTCNN_DATA"),
               date=datetime.datetime.now().isoformat(timespec="seconds"), stages=stages))
else:  # annotate FILE COMMAND
    path = pathlib.Path(sys.argv[2])
    if path.exists():
        doc = json.loads(path.read_text())
        doc["fastcnn_session"] = dict(facts, command=sys.argv[3])
        write(path, doc)
EOF
export GS_WORK=$work GS_DEVICE=$gpu GS_COMMIT=$commit GS_BUDGET=$budget GS_COMMAND="bash bench/gpu_session.sh $*"
annotate() { $py "$meta" annotate "$1" "$2" 2>&1 | tee -a "$log"; }

# One line per stage in stages.txt (and, in lease and lease2, in the state that lease2 reads).
record() {
  echo "$*" >> "$work/stages.txt"
  if [ -n "$state_on" ]; then echo "$*" >> "$state/verdicts"; fi
}

pack() {
  $py "$meta" session 2>&1 | tee -a "$log"
  cp "$work/gpu-$gpu-session.json" "$out/" 2>/dev/null
  tar -C "$(dirname "$work")" -czf "$out/gpu-results.tar.gz.part" gpu-results && \
    mv "$out/gpu-results.tar.gz.part" "$out/gpu-results.tar.gz"
}

# stage NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the call's budget), log everything,
# record the verdict, re-pack the results, never abort the script. SIGINT first: fastcnn bench and pytest then
# write what they measured; `grace` seconds later, SIGKILL.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS - 25))
  if [ "$left" -lt 20 ]; then
    say "stage $name: skipped, the call's budget of ${budget}s is spent"
    record "$name skipped=budget"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "stage $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout --signal=INT --kill-after="${grace:-15}" "$limit" "$@" 2>&1 | tee -a "$log" "$work/$name.log" >/dev/null
  local rc=${PIPESTATUS[0]}
  say "stage $name: exit $rc after $((SECONDS - started)) s"
  record "$name exit=$rc seconds=$((SECONDS - started))"
  pack
  return 0
}

# gpu_only NAME WHY: true on a CUDA machine; elsewhere records NAME as skipped, with WHY.
gpu_only() {
  [ "$cuda" = 1 ] && return 0
  say "stage $1: skipped, no CUDA GPU here: $2"
  record "$1 skipped=no-cuda ($2)"
  return 1
}

fastcnn=("$py" -m fastcnn)
# pytest-timeout is on the GPU image; elsewhere run without per-test limits.
per_test_limit=()
$py -c "import pytest_timeout" 2>/dev/null && per_test_limit=(--timeout 240)
pytest=("$py" -m pytest -q -p no:cacheprovider -rs)
timing=(--benchmark-max-time=0.3 --benchmark-min-rounds=20)
# Without CUDA the epoch stages check the script, not the speed: a subset keeps them to seconds.
subset=()
[ "$cuda" = 1 ] || subset=(--train-subset 2048 --test-subset 1024)
# The kernel cell: SimpleCNN's layer at batch 512 in bf16, forward + backward, and the training step's memory.
kernel_cell="simplecnn and 512 and bf16 and (forward_backward or peak_memory)"
lease_units=(cuda-kernel-tests cuda-graph-tests epoch-b64 epoch-b512 epoch-cudnn-b64 kernel-cell
  epoch-ablation-b64 profile-fast-b64)
lease2_units=(cuda-tests-more kernels-all)
units=" ${lease_units[*]} ${lease2_units[*]} "

run_install() {
  stage install 120 $py -m pip install -q --no-deps --no-build-isolation -e .
  stage env 60 $py "$meta" env
  annotate "$work/gpu-$gpu-env.json" "fastcnn env --json (fastcnn.env_report.collect())"
  $py -c "import nvidia.dali" 2>/dev/null || say "DALI is not importable here: the dali lines skip (DALI's wheels, \
about 300 MB, cannot travel within a lease; its GPU path stays unmeasured)"
  [ -n "${FASTCNN_DATA:-}" ] || say "FASTCNN_DATA is unset and .gpu/data is missing (run bash bench/gpu_session.sh \
prepare before the lease): the MNIST stages will fail"
  [ "$cuda" = 1 ] || say "no CUDA GPU here: CUDA-only stages skip, the epoch stages train on a 2048-image subset"
}

# epoch_stage NAME SECONDS BATCH CONFIGS: MNIST epochs of CONFIGS, test accuracy on every line.
epoch_stage() {
  stage "$1" "$2" "${fastcnn[@]}" bench --epoch --dataset mnist -b "$3" --repeats 1 --configs "$4" "${subset[@]}" \
    --json "$work/gpu-$gpu-$1.json"
}

run_unit() {
  local json="$work/gpu-$gpu-$1.json"
  case $1 in
    cuda-kernel-tests)
      gpu_only "$1" "on a CPU the test suite runs these kernels under the Triton interpreter" || return 0
      FASTCNN_AUTOTUNE=0 stage "$1" 45 "${pytest[@]}" "${per_test_limit[@]}" tests/test_conv_relu_pool.py \
        -k "not random_shapes and not opcheck" --junitxml="$work/$1.xml" ;;
    cuda-graph-tests)
      gpu_only "$1" "CUDA graphs need a CUDA GPU" || return 0
      FASTCNN_AUTOTUNE=0 stage "$1" 15 "${pytest[@]}" "${per_test_limit[@]}" -m gpu tests/test_cuda_graph.py \
        -k "graph_replayed and not compiled" --junitxml="$work/$1.xml" ;;
    epoch-b64) epoch_stage "$1" 100 64 reference,fast ;;
    epoch-b512) epoch_stage "$1" 60 512 fast ;;
    epoch-cudnn-b64) epoch_stage "$1" 60 64 fast-aten ;;
    kernel-cell|kernels-all)
      gpu_only "$1" "a benchmark of CUDA kernels" || return 0
      local select=$kernel_cell limit=120
      [ "$1" = kernels-all ] && select="not max_autotune and not ($kernel_cell)" limit=150
      stage "$1" "$limit" "${pytest[@]}" bench/test_bench_conv_relu_pool.py -k "$select" --benchmark-json="$json" \
        "${timing[@]}"
      annotate "$json" "pytest bench/test_bench_conv_relu_pool.py -k '$select' ${timing[*]}"
      if [ -f "$json" ]; then
        stage "$1-report" 30 $py bench/kernel_report.py "$json" --json "$work/gpu-$gpu-$1-summary.json"
        annotate "$work/gpu-$gpu-$1-summary.json" "python bench/kernel_report.py gpu-$gpu-$1.json"
      fi ;;
    epoch-ablation-b64)
      if [ "$cuda" != 1 ]; then
        say "stage $1: skipped on a CPU: its torch.compile lines take minutes of Inductor C++ builds there"
        record "$1 skipped=cpu (its torch.compile lines take minutes of Inductor C++ builds on a CPU)"
        return 0
      fi
      stage "$1" 150 "${fastcnn[@]}" bench --ablation --epoch --dataset mnist -b 64 --repeats 1 --json "$json" \
        --plot "${json%.json}.png" ;;
    profile-fast-b64)
      # A process of its own: the profiler and CUDA graphs have crashed together on some CUDA versions.
      stage "$1" 60 "${fastcnn[@]}" bench --dataset mnist -b 64 --steps 20 --warmup 5 --repeats 1 --profile 20 \
        --configs fast "${subset[@]}" --json "$json" ;;
    cuda-tests-more)
      gpu_only "$1" "on a CPU the test suite runs these under the Triton interpreter or skips them" || return 0
      FASTCNN_AUTOTUNE=0 stage "$1" 150 "${pytest[@]}" "${per_test_limit[@]}" tests/test_conv_relu_pool.py \
        tests/test_cuda_graph.py tests/test_kernel_choice.py tests/test_kernel_configs.py \
        -k "(test_conv_relu_pool.py and (random_shapes or opcheck)) or test_kernel_configs.py or \
(test_cuda_graph.py and compile) or measured_on_the_gpu" --junitxml="$work/$1.xml" ;;
  esac
}

# reached UNIT: whether an earlier lease or lease2 on this machine ran UNIT to its end (or skipped it for good).
reached() {
  local verdict
  verdict=$(grep "^$1 " "$state/verdicts" 2>/dev/null | tail -n 1)
  [ -n "$verdict" ] || return 1
  case "$verdict " in *skipped=budget*|*" exit=124 "*|*" exit=130 "*|*" exit=137 "*) return 1 ;; esac
  return 0
}

run_lease() {
  mkdir -p "$state" && rm -f "$state/plan" "$state/verdicts" && state_on=1
  echo "${lease_units[*]}" > "$state/plan"
  run_install
  for unit in "${lease_units[@]}"; do run_unit "$unit"; done
}

run_lease2() {
  mkdir -p "$state" && state_on=1
  run_install
  local todo=("${lease_units[@]}")
  if [ ! -f "$state/plan" ]; then
    say "no record of lease on this machine: lease2's own stages only (rerun a stage of lease by name if needed)"
    todo=(epoch-ablation-b64 profile-fast-b64)
  fi
  for unit in "${todo[@]}" "${lease2_units[@]}"; do
    if reached "$unit"; then
      say "stage $unit: not run again, it ended earlier here ($(grep "^$unit " "$state/verdicts" | tail -n 1))"
      record "$unit skipped=done-earlier"
    else
      run_unit "$unit"
    fi
  done
}

run_tests() {
  # Every GPU-marked test (CUDA graphs, DDP, DALI GPU, kernel choice), then the kernel and accelerate tests, which
  # run on CUDA tensors when a GPU is visible; the other tests are CPU tests that CI runs anyway.
  stage gpu-tests 300 "${pytest[@]}" "${per_test_limit[@]}" -m gpu tests --junitxml="$work/gpu-tests.xml"
  FASTCNN_AUTOTUNE=0 stage kernel-tests 300 "${pytest[@]}" "${per_test_limit[@]}" -m "not gpu" \
    tests/test_conv_relu_pool.py tests/test_kernel_configs.py tests/test_accelerate.py tests/test_kernel_choice.py \
    tests/test_cuda_graph.py --junitxml="$work/kernel-tests.xml"
}

run_ablation() {
  for batch in 64 512; do
    stage "ablation-b$batch" 240 "${fastcnn[@]}" bench --ablation --dataset mnist -b "$batch" \
      --json "$work/gpu-$gpu-ablation-b$batch.json" --plot "$work/gpu-$gpu-ablation-b$batch.png"
  done
}

run_variants() {
  stage variants-b64 300 "${fastcnn[@]}" bench --epoch --dataset mnist -b 64 --repeats 3 \
    --configs fast,fast-fp32,fast-nchw,fast-aten,fast-default-opt --json "$work/gpu-$gpu-variants-b64.json"
  # A process of its own: the profiler and CUDA graphs have crashed together on some CUDA versions.
  stage profile-b64 180 "${fastcnn[@]}" bench --dataset mnist -b 64 --steps 20 --warmup 5 --repeats 1 --profile 20 \
    --configs fused-opt,cuda-graph,fast,fast-fp32,fast-nchw --json "$work/gpu-$gpu-profile-b64.json"
}

run_ddp() {
  local common=(train --dataset mnist -b 512 --epochs 2 --cuda-graph --no-progress --seed 0)
  # grace beyond torchrun's own 30 s for its workers (they run in sessions of their own).
  grace=45 stage ddp-single 180 "${fastcnn[@]}" "${common[@]}" --output "$work/ddp-single"
  grace=45 stage ddp-nproc1 240 "${fastcnn[@]}" "${common[@]}" --nproc 1 --output "$work/ddp-nproc1"
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

say "device: $gpu; stages: $*; budget ${budget}s; data: ${FASTCNN_DATA:-none}; commit ${commit:-unknown}"
for name in "$@"; do
  case $name in
    lease) run_lease ;;
    lease2) run_lease2 ;;
    install|tests|ablation|variants|ddp) "run_$name" ;;
    kernels) run_unit kernel-cell; run_unit kernels-all ;;
    epoch) for unit in epoch-b64 epoch-b512 epoch-cudnn-b64 epoch-ablation-b64; do run_unit "$unit"; done ;;
    *)
      if [[ $units == *" $name "* ]]; then run_unit "$name"; continue; fi
      say "unknown stage $name (choose from prepare lease lease2 install tests kernels ablation epoch variants ddp" \
        "${lease_units[*]} ${lease2_units[*]})"
      pack; exit 2 ;;
  esac
done
pack
say "done: $(tr '\n' ';' < "$work/stages.txt" 2>/dev/null)"
