#!/usr/bin/env bash
# Everything only a GPU can show, as one `device` call (see benchmarks/kernels/README.md):
#   run from the repository root; results land under $OUT (the device tool brings it back).
# 1. the kernel tests that need no vLLM, compiled on the GPU: fp32/fp16 against the torch
#    references, the `gpu`-marked bf16 and CUDA-graph capture/replay cases, and the side-stream
#    page-in copies (tests/kernels/test_page_copier.py);
# 2. the SGMV benchmark (benchmarks/kernels/bench_sgmv.py) into $OUT/<GPU name>/, with vLLM's
#    kernels as a baseline when .vllm_ops was carried (benchmarks/kernels/pack_vllm_ops.py).
# Device call: run(command="bash benchmarks/kernels/gpu_session.sh", carry=[".vllm_ops"]).
# The device image has torch, triton and pytest but not vLLM or the gateway's packages, so
# conftest collection stops at tests/kernels.
set -uo pipefail
OUT=${OUT:-/tmp/loraplex-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
{ date -u +%FT%TZ; nvidia-smi -L; "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT/env.txt"

"$PY" -m pytest -q --confcutdir=tests/kernels -p no:cacheprovider -o addopts="-ra" \
  tests/kernels/test_page_copier.py tests/kernels/test_paged_pool.py \
  tests/kernels/test_sgmv_ops.py tests/kernels/test_paged_lora_triton.py \
  tests/kernels/test_sgmv_metadata.py tests/kernels/test_sgmv_compile.py \
  2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

# vLLM's own lora_shrink/lora_expand for the `vllm` column: packed here beforehand with
# `python -m benchmarks.kernels.pack_vllm_ops --out .vllm_ops` and carried (the image has no vLLM)
if [ -d .vllm_ops ]; then
  cp .vllm_ops/SOURCE.txt "$OUT/vllm_ops_SOURCE.txt"
  bench_path=$PWD/.vllm_ops${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .vllm_ops: the vllm column stays empty" | tee -a "$OUT/env.txt"
  bench_path=${PYTHONPATH:-}
fi
PYTHONPATH=$bench_path "$PY" -m benchmarks.kernels.bench_sgmv --out "$OUT/$gpu" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/env.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
