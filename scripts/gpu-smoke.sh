#!/usr/bin/env bash
# GPU smoke test: the GPU paths for real, in under 5 minutes on one GPU, with no network.
#   bash scripts/gpu-smoke.sh            (from the repository root, in an environment with CUDA torch)
# Builds the tiny model, then runs:
#   1. the `gpu` tests (torch learner on cuda in bf16, HF engine + feature model on the GPU, verified reload);
#   2. the local example with the learner (torch) and the generator on the GPU: vLLM when its CUDA build
#      is installed, else the HF engine; both processes must report CUDA memory in summary.json;
#   3. the same job with the DeepSpeed backend (when deepspeed is installed);
#   4. optional: TRL's async GRPO (bench/peer_trl.py's GPU-only run) when TRL and vLLM's CUDA build are there;
#   5. `--dry-run --gpus 8` of every example.
# One line per check: "ok <check>" or "FAIL <check>: <why>"; exit 1 when any check failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/workloads:$PWD/operator${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ASYNCRLHF_CACHE="${ASYNCRLHF_CACHE:-$PWD/.cache/asyncrlhf}"
OUT="${OUT:-$PWD/runs/gpu-smoke}"
mkdir -p "$OUT"
failed=0
check() {  # check NAME CMD...: run, print one line
  local name=$1; shift
  if "$@" >"$OUT/$name.log" 2>&1; then echo "ok $name"; else echo "FAIL $name: see $OUT/$name.log (last: $(tail -n 1 "$OUT/$name.log"))"; failed=1; fi
}
have() { $PY -c "import $1" >/dev/null 2>&1; }

check cuda $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0))"
check build-tiny-model $PY -c "from asyncrlhf.models import resolve_model; print(resolve_model('builtin:tiny-sort'))"
check gpu-tests $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider

engine=hf; have vllm && $PY -c "import vllm.platforms as p; assert not p.current_platform.is_cpu()" 2>/dev/null && engine=vllm
job() {  # job NAME BACKEND: the local example on one GPU shared by learner and generator (2 processes)
  cat >"$OUT/$1.yaml" <<YAML
apiVersion: asyncrlhf.dev/v1alpha1
kind: AsyncRLHFJob
metadata: {name: $1}
spec:
  model: {policy: "builtin:tiny-sort", dtype: bfloat16}
  algorithm: {loss: online-dpo, samplesPerPrompt: 4}
  generator: {engine: $engine, memoryFraction: 0.3, sampling: {maxTokens: 8}, resources: {gpus: 1}}
  learner: {gpusPerNode: 1, backend: $2, promptsPerStep: 16, totalSteps: 6, optimizer: {lr: 0.0003}}
  weightSync: {everySteps: 1}
YAML
}
# the plan needs 2 GPUs; on a 1-GPU machine CUDA_VISIBLE_DEVICES=0,0 names the one GPU twice, which
# the runner takes as sharing it on purpose (placement.machine_gpus): learner and generator both get GPU 0
gpu_ids=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
run_job() {  # run_job NAME BACKEND
  job "$1" "$2"
  if [ "${gpu_ids:-0}" -ge 2 ]; then CUDA_VISIBLE_DEVICES=0,1 timeout 240 $PY -m asyncrlhf.cli run "$OUT/$1.yaml" --runs-dir "$OUT" --quiet
  else CUDA_VISIBLE_DEVICES=0,0 timeout 240 $PY -m asyncrlhf.cli run "$OUT/$1.yaml" --runs-dir "$OUT" --quiet; fi
}
used_cuda() {  # used_cuda NAME: summary.json says the run finished and every process allocated CUDA memory
  $PY - "$OUT/$1/summary.json" <<'PYCHECK'
import json, sys
s = json.load(open(sys.argv[1]))
assert s.get("ok"), "the run did not finish"
mem = s.get("cuda_max_memory_allocated") or {}
assert mem and all(v > 0 for v in mem.values()), f"CUDA memory per process: {mem or 'not reported'}"
print(mem)
PYCHECK
}
check "local-$engine-torch" run_job smoke-torch torch
check "local-$engine-torch-on-cuda" used_cuda smoke-torch
if have deepspeed; then
  check "local-$engine-deepspeed" run_job smoke-ds deepspeed
  check "local-$engine-deepspeed-on-cuda" used_cuda smoke-ds
else echo "skip deepspeed: not installed"; fi
# optional: TRL's asynchronous GRPO (the peer bench's GPU-only run): its trainer generates on a
# `trl vllm-serve` server and sends weights over NCCL, so it needs TRL (the bench extra) and vLLM's CUDA build
if have trl && [ "$engine" = vllm ]; then
  model=$($PY -c "from asyncrlhf.models import resolve_model; print(resolve_model('builtin:tiny-sort'))")
  CUDA_VISIBLE_DEVICES=0 $PY -m trl.cli.main vllm-serve --model "$model" --port 8765 --gpu-memory-utilization 0.3 \
    >"$OUT/trl-vllm-serve.log" 2>&1 &
  trl_server=$!
  TRL_VLLM_URL=http://127.0.0.1:8765 check trl-async-grpo timeout 300 $PY bench/peer_trl.py --trial trl-async-grpo \
    --steps 3 --out "$OUT/trl-async-grpo.json"
  kill "$trl_server" 2>/dev/null; wait "$trl_server" 2>/dev/null
else echo "skip trl-async-grpo: needs TRL (pip install -e '.[bench]') and vLLM's CUDA build"; fi
for f in examples/*.yaml; do check "dry-run-$(basename "$f" .yaml)" $PY -m asyncrlhf.cli run --dry-run "$f" --gpus 8 --runs-dir "$OUT/dry"; done
exit $failed
