#!/usr/bin/env bash
# Every GPU check in one prepared run (about 6-8 minutes on one H100/H200): the gpu-marked tests, the MoE layer
# benchmark (bf16-mixed and bf16), the whole-model training-step benchmark and one short `run.py trainer=gpu`.
# Results go to experiments/results/<name>_<gpu>.txt (gpu: the device name, e.g. nvidia_h100_80gb_hbm3).
#
#   bash experiments/gpu_check.sh            # on the GPU machine, from the repository root
#   QUICK=1 bash experiments/gpu_check.sh    # fewer repetitions and one sequence length (about 4 minutes)
#
# Lent GPU machines have no network, and their image (torch 2.11, transformers, lightning) lacks some of our
# dependencies. Prepare these two ignored folders HERE (a machine with pip and the package), once; they travel
# with the tree (the device tool's `carry`: [".whl", ".gpu_data"]):
#
#   echo /.whl/ >> .git/info/exclude; echo /.gpu_data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.2 omegaconf==2.3.0 webdataset braceexpand soundfile cffi pycparser
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: build it
#   python -c "from most_lightning.data.testing import build_tiny_corpus; build_tiny_corpus('.gpu_data')"
#
# The tiny corpus is built here because the GPU image has no flite (the demo corpus' speech synthesiser).
# Wheels are never committed. Each step runs even if an earlier one failed; the exit status is the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 100; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MOST_GPU_DATA_DIR="${MOST_GPU_DATA_DIR:-$PWD/.gpu_data}"

gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower())" | tr -c 'a-z0-9\n' '_' | sed 's/_*$//')
[ -n "$gpu" ] || { echo "no CUDA GPU visible"; exit 101; }
results=experiments/results
mkdir -p "$results"
out() { echo "$results/$1_$gpu.txt"; }
if [ -n "${QUICK:-}" ]; then
    moe_args=(--shapes lite --reps 5 --inner 3); model_args=(--seqs 2048 --steps 3)
else
    moe_args=(--shapes S,M,lite); model_args=(--seqs 2048,4096)
fi

failed=0
step() {  # step <name> <timeout seconds> <command...>: output to the console and to results/<name>_<gpu>.txt
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$(out "$name")"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$(out "$name")"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$(out "$name")"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  | tee "$(out environment)"
step pytest_gpu 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_router.py
step bench_moe_gpu 150 python3 experiments/bench_moe_gpu.py "${moe_args[@]}" --profile "$results/moe_trace_$gpu"
step bench_model_gpu 240 python3 experiments/bench_model_gpu.py "${model_args[@]}"
run_dir=$(mktemp -d)
step run_py_gpu 120 python3 run.py trainer=gpu debug=fast data=tiny "paths.data_dir=$MOST_GPU_DATA_DIR" \
    "paths.output_dir=$run_dir/run" "paths.log_dir=$run_dir/logs" callbacks.rich_progress_bar=null
echo "failed steps: $failed (results in $results/*_$gpu.txt)"
exit "$failed"
