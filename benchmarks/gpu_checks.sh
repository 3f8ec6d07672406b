#!/usr/bin/env bash
# Every check that needs a CUDA GPU: the CUDA build, the CUDA tests, and the spectral, MoE-LoRA
# and serving benchmarks on the GPU. Each stage has its own time limit, so one slow stage cannot
# starve the rest; a failing stage is reported and the next one runs. Output: one log, a summary and
# the benchmarks' JSON in RESULTS_DIR. Stage times on an H100 (2026-11-27): build 35-47 s, tests 36-50 s in 8
# workers, spectral 72 s, moe_lora 25 s, serving 129-136 s, moe_lora_bf16 21-28 s, moe_lora_model 48 s, forms 20 s,
# forms_bf16 7-9 s, attention 6-11 s. A fresh machine takes some 40 s to start.
#
#     bash benchmarks/gpu_checks.sh [RESULTS_DIR [STAGE ...]]     (default: gpu-results, all stages)
#
# Stages: build tests spectral moe_lora serving moe_lora_bf16 moe_lora_model profile products products_bf16 forms
# forms_bf16 attention serving_profile spectral_one_stream.
# A later run on the same machine can skip the build (e.g. `bash benchmarks/gpu_checks.sh out moe_lora serving`).
# All stages together can outlast a 10-minute command limit; run them in two calls on one machine:
#     bash benchmarks/gpu_checks.sh OUT build tests spectral moe_lora serving
#     bash benchmarks/gpu_checks.sh OUT2 moe_lora_bf16 moe_lora_model profile products products_bf16 forms forms_bf16 \
#       attention serving_profile
#
# Needs a CUDA build of torch with nvcc (CUDA_HOME), transformers, peft and safetensors; builds
# for the GPU in the machine (TORCH_CUDA_ARCH_LIST, default 9.0 for an H100/H200).
set -u -o pipefail
results=${1:-$(dirname "$0")/../gpu-results}
case $results in /*) ;; *) results="$PWD/$results" ;; esac  # relative to where it was called from
shift || true
cd "$(dirname "$0")/.."
all_stages="build tests spectral moe_lora serving moe_lora_bf16 moe_lora_model profile products products_bf16 forms forms_bf16 attention serving_profile"
stages=${*:-$all_stages spectral_one_stream}
mkdir -p "$results"
python=${PYTHON:-python3}
log="$results/gpu_checks.log"
summary="$results/summary.txt"
touch "$log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  start=$(date +%s)
  echo "===== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && failed=1
  echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$summary" "$log"
}

{ nvidia-smi -L; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  2>&1 | tee -a "$summary" >> "$log"

# An editable install; where pip cannot (an older setuptools refusing the project metadata, say),
# the extension built in place without the metadata and the serving package linked in.
build="$python -m pip install --no-build-isolation --no-deps --no-index -q -e . && exit 0
echo 'pip could not install; building in place'
mv pyproject.toml pyproject.toml.aside && $python setup.py -q build_ext --inplace; rc=\$?
mv pyproject.toml.aside pyproject.toml
[ \$rc -eq 0 ] && { [ -e alphalora/serving ] || ln -s ../serving alphalora/serving; }"
stage build 180 env ALPHALORA_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" \
  bash -c "$build"
"$python" -c "import alphalora._C, alphalora.serving.engine" >> "$log" 2>&1 \
  || echo "warning: alphalora._C or alphalora.serving does not import" | tee -a "$summary"
# In worker processes where pytest-xdist is installed: a test that crashes the interpreter is then
# reported as a failure and the others still run. The emulated-CUDA tests ran in CI already.
# (tests/conftest.py then gives each worker its share of the cores: with a thread per core in every worker, the
# CPU halves of the tests ran some 50 times slower on the H100 machine, 2026-11-27.) Where pytest-timeout is
# installed, a test over 120 s is reported as a failure with its stack, and the others still run.
workers=$("$python" -c "import xdist" 2>/dev/null && echo "-n 8")
per_test=$("$python" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
stage tests 240 "$python" -m pytest -q -rf -p no:cacheprovider $workers $per_test -k "(cuda or test_build) and not emulat" tests/ops \
  tests/adapters/test_layer.py tests/adapters/test_product_forms.py tests/serving/test_engine.py \
  tests/serving/test_routing_layout.py \
  tests/serving/test_prefix_cache.py tests/training/test_train.py tests/spectral/test_bad_input.py \
  tests/spectral/test_cuda_analysis.py tests/spectral/test_fp32_refine.py
stage spectral 150 "$python" benchmarks/spectral.py --models llama7b --llama-layers 32 --device cuda --skip-ww \
  --repeats 1 --json "$results/spectral_cuda.json"
stage moe_lora 90 "$python" benchmarks/moe_lora.py --device cuda --hidden 4096 --tokens 8192 \
  --json "$results/moe_lora_cuda.json"
stage serving 200 "$python" benchmarks/serving.py --device cuda --dtype bf16 --layers 8 --hidden 1024 \
  --requests 128 --json "$results/serving_cuda.json"
stage moe_lora_bf16 60 "$python" benchmarks/moe_lora.py --device cuda --dtype bf16 --hidden 4096 --tokens 8192 \
  --json "$results/moe_lora_cuda_bf16.json"
# A training step at a size a GPU trains (the row above is launch-bound on one): 8 layers, hidden 2048,
# 8 x 512 tokens, bf16 as `alphalora train --bf16` runs it.
stage moe_lora_model 90 "$python" benchmarks/moe_lora.py --device cuda --dtype bf16 --sections model \
  --model-layers 8 --model-hidden 2048 --batch 8 --seq 512 --json "$results/moe_lora_model_cuda.json"
stage profile 90 "$python" benchmarks/moe_lora_profile.py --device cuda --dtype bf16 --hidden 4096 --tokens 8192 \
  --json "$results/moe_lora_profile_cuda.json"
# Each product of the dense MoE-LoRA layer's adapter part alone against the memory roofline, with other ways of
# computing it (the layer's roofline target, issue 3).
stage products 60 "$python" benchmarks/adapter_products.py --device cuda --hidden 4096 --tokens 8192 \
  --json "$results/adapter_products_cuda.json"
stage products_bf16 60 "$python" benchmarks/adapter_products.py --device cuda --dtype bf16 --hidden 4096 \
  --tokens 8192 --json "$results/adapter_products_cuda_bf16.json"
# Decode attention over the paged KV cache: the CUDA kernel against the gather + SDPA path it replaced.
stage attention 60 "$python" benchmarks/paged_attention.py --device cuda --dtype bf16 \
  --json "$results/paged_attention_cuda_bf16.json"
# The whole layer under each product form (alphalora/adapters/product_forms.py): which form's adapter part comes
# nearest the roofline, fp32 and bf16; the best one becomes the GPU default.
stage forms 60 "$python" benchmarks/moe_lora.py --device cuda --hidden 4096 --tokens 8192 --sections forms \
  --json "$results/moe_lora_forms_cuda.json"
stage forms_bf16 60 "$python" benchmarks/moe_lora.py --device cuda --dtype bf16 --hidden 4096 --tokens 8192 \
  --sections forms --json "$results/moe_lora_forms_cuda_bf16.json"
stage serving_profile 90 "$python" benchmarks/serving_profile.py --device cuda --dtype bf16 \
  --json "$results/serving_profile_cuda.json"
# The same with cuSOLVER's solves one after another (ATen's own loop), against the default of four streams
# (the `spectral` stage); last, as the least needed.
stage spectral_one_stream 150 env ALPHALORA_EIGH_STREAMS=1 "$python" benchmarks/spectral.py --models llama7b \
  --llama-layers 32 --device cuda --skip-ww --repeats 1 --json "$results/spectral_cuda_one_stream.json"
exit "$failed"
