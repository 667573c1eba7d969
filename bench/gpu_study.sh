#!/usr/bin/env bash
# The studies that fit the GPU machine (study 1, `lorafuse experiment loramap`; study 3, recycling), which has no network and no `datasets`.
# Everything it needs travels in the git-ignored folder .carry/:
#   .carry/wheels/   datasets, dill, multiprocess, and nevergrad (LoraHub) with bayesian-optimization,
#                    cma, directsearch: pure-Python wheels, installed to /tmp/site
#   .carry/data/     covidfact/ and scifact-rte/ copied from the data folder
#   .carry/minilm/   all-MiniLM-L6-v2 in the transformers layout (weights saved as float16 to fit the
#                    carry limit; load_model reads a local folder as float32)
# Usage (results go to results/<name>/ in the tree and their json/md/png plus the log to $OUT):
#   OUT=/tmp/out LORAFUSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_study.sh smoke
#   OUT=/tmp/out LORAFUSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_study.sh full [extra flags]
#   OUT=/tmp/out LORAFUSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_study.sh probe [extra flags]
#   OUT=/tmp/out LORAFUSE_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_study.sh recycling [extra flags]
# probe: bench/study_probe.py (which adapter setting lets the model learn COVID-Fact at all);
# recycling: study 3 on the two-hop world with 128 subjects, seeds 0 1 2 (results/recycling-gpu/);
# smoke: a small run (512 training / 128 eval examples, seed 0, three methods) that also counts how
# often the composed layers ran the Triton kernels; full: all data, seeds 0 1 2, default epochs.
# Extra flags go to `lorafuse experiment loramap` (e.g. --epochs 2 --compose-epochs 1 to shorten a run).
# STUDY_TIMEOUT (seconds, default 540) stops the study; the result files are rewritten after every
# seed ("complete": false until the last), so a run cut short still brings back its finished seeds.
# The copied tree may hold uncommitted edits: to run exactly a commit, export it here
# (rm -rf .carry/tree; mkdir .carry/tree; git archive HEAD | tar -x -C .carry/tree) and lay it over
# the copy before this script: tar -C .carry/tree -cf - . | tar -xf -
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
mode=${1:-smoke}
shift || true

if ! $PY -c "import datasets, nevergrad" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -e lorafuse/kernels ] || ln -s ../kernels lorafuse/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton, transformers, peft, datasets, pyarrow, fsspec, huggingface_hub as h, nevergrad; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, \
'fsspec', fsspec.__version__, 'hub', h.__version__)" || exit 1
[ -n "${LORAFUSE_COMMIT:-}" ] || echo "warning: LORAFUSE_COMMIT is not set; the results take the commit from git here"

if [ "$mode" = probe ]; then  # bench/study_probe.py: can the model learn COVID-Fact, by adapter setting
  timeout "${STUDY_TIMEOUT:-540}" $PY bench/study_probe.py --data .carry/data --model .carry/minilm "$@" 2>&1 \
    | grep -v "it/s\]" | tee "$OUT/probe.log"
  rc=${PIPESTATUS[0]}; cp results/loramap-probe/probe.json "$OUT"/ 2>/dev/null; exit "$rc"
fi
case "$mode" in
  smoke) name=loramap-smoke
         cmd=(experiment loramap --out "results/$name" --data .carry/data --model .carry/minilm --quiet
              --train-limit 512 --eval-limit 128 --seeds 0 --methods base loramap_sum lora_direct) ;;
  full)  name=loramap-full
         cmd=(experiment loramap --out "results/$name" --data .carry/data --model .carry/minilm --quiet) ;;
  recycling) name=recycling-gpu
         cmd=(experiment recycling --out "results/$name" --model .carry/minilm --quiet --seeds 0 1 2 --people 128) ;;
  *) echo "mode must be smoke, full, recycling or probe, got $mode"; exit 2 ;;
esac
t0=$(date +%s)
# The study through the CLI, with a count of the composed layers' calls that took the Triton kernels
# (lorafuse.ops._use_kernels) and those that fell back to torch: on a GPU the second must stay 0.
timeout "${STUDY_TIMEOUT:-540}" $PY - "${cmd[@]}" "$@" <<'EOF' 2>&1 | tee "$OUT/$name.log"
import sys
import torch
import lorafuse.ops as ops
from lorafuse.cli import main

assert torch.cuda.is_available(), "no CUDA device"
counts = {True: 0, False: 0}
_use = ops._use_kernels


def counted(x):
    ok = _use(x)
    counts[ok] += 1
    return ok


ops._use_kernels = counted
sys.argv = ["lorafuse"] + sys.argv[1:]
rc = main(sys.argv[1:])
print(f"composed-layer calls: {counts[True]} on the Triton kernels, {counts[False]} on the torch fallback")
sys.exit(rc)
EOF
rc=${PIPESTATUS[0]}
cp "results/$name"/*.{json,md,png} "$OUT"/ 2>/dev/null
for d in "results/$name"/seed*/; do  # multi-seed studies: each seed's own results too
  [ -f "$d/recycling.json" ] && cp "$d/recycling.json" "$OUT/$(basename "$d")-recycling.json"
done
echo "== $mode: $(( $(date +%s) - t0 ))s, rc $rc"
exit "$rc"
