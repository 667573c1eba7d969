#!/usr/bin/env bash
# The GPU job in one command: install lorafuse (offline), then the steps asked for, in order:
#   test    the GPU suite (kernel/op/module tests on CUDA: bf16 and fp16 included, large shapes)
#   tune    bench/tune.py, the launch-config sweep
#   bench   bench/bench_kernels.py, the full kernel benchmark grid
#   smoke   bench/bench_kernels.py --smoke --quick
#   model   bench/bench_model.py, a decoder stack with K adapters: lorafuse against peft and the base
#   launch  bench/launch_cost.py, host time of one small layer call, level by level
#   extra:<cmd>  any other command (e.g. "extra:python3 bench/bench_routing.py")
# Logs and JSON go to $OUT (default ./gpu-out). Example:
#   OUT=/tmp/out LORAFUSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_run.sh test bench
# A copied tree may carry stale git metadata: pass the commit the results are to name in
# LORAFUSE_COMMIT (bench/common.py records it in every result file).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# The GPU machine has no network, so no pip build: lay the package out in place instead
# (kernels/ is installed as lorafuse.kernels).
[ -e lorafuse/kernels ] || ln -s ../kernels lorafuse/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"

[ -n "${LORAFUSE_COMMIT:-}" ] || echo "warning: LORAFUSE_COMMIT is not set; result files take the commit from git here"
status=0
for step in "$@"; do
  t0=$(date +%s)
  case "$step" in
    test)
      # Triton compiles each specialisation on the CPU: spread the suite over processes (pytest-xdist,
      # where installed; without it the suite runs in one process, several times slower).
      if $PY -c "import xdist" 2>/dev/null; then procs=(-n "${TEST_PROCS:-12}"); else
        procs=(); echo "pytest-xdist not installed: one process (pip install pytest-xdist to spread it)"; fi
      timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -q -p no:cacheprovider ${procs[@]+"${procs[@]}"} --tb=line -rfE \
        tests/test_kernels.py tests/test_ops.py tests/test_modules.py ${TEST_EXTRA:-} >"$OUT/test.log" 2>&1
      rc=$?; grep -E "FAILED|ERROR|passed|failed|Error" "$OUT/test.log" | tail -n 40; [ $rc -eq 0 ] || status=$rc
      # The shrink has two implementations; if the default split grid fails here, later steps
      # measure the one-kernel path (which the same suite also checks) instead of a broken one.
      if grep -qE "FAILED.*shrink.*split" "$OUT/test.log"; then
        export LORAFUSE_SHRINK=single
        echo "shrink split path failed on this GPU: later steps use LORAFUSE_SHRINK=single"
      fi ;;
    tune)
      timeout "${TUNE_TIMEOUT:-560}" $PY bench/tune.py --out "$OUT" ${TUNE_ARGS:-} >"$OUT/tune.log" 2>&1
      rc=$?; grep -E "^\[|wrote|Error" "$OUT/tune.log" | tail -n 60; [ $rc -eq 0 ] || status=$rc ;;
    bench)
      timeout "${BENCH_TIMEOUT:-580}" $PY bench/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
      rc=$?; grep -E "^T=|wrote|Error" "$OUT/bench.log" | tail -n 70; [ $rc -eq 0 ] || status=$rc ;;
    smoke)
      $PY bench/bench_kernels.py --smoke --quick --out "$OUT" --prefix smoke >"$OUT/smoke.log" 2>&1
      rc=$?; tail -n 12 "$OUT/smoke.log"; [ $rc -eq 0 ] || status=$rc ;;
    model)
      timeout "${MODEL_TIMEOUT:-500}" $PY bench/bench_model.py --out "$OUT" ${MODEL_ARGS:-} >"$OUT/model.log" 2>&1
      rc=$?; grep -E "ms |wrote|Error" "$OUT/model.log" | tail -n 30; [ $rc -eq 0 ] || status=$rc ;;
    launch)
      $PY bench/launch_cost.py --out "$OUT" >"$OUT/launch.log" 2>&1
      rc=$?; tail -n 40 "$OUT/launch.log"; [ $rc -eq 0 ] || status=$rc ;;
    extra:*)
      bash -c "${step#extra:}" >>"$OUT/extra.log" 2>&1
      rc=$?; tail -n 40 "$OUT/extra.log"; [ $rc -eq 0 ] || status=$rc ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
  echo "== $step: $(( $(date +%s) - t0 ))s"
done
exit $status
