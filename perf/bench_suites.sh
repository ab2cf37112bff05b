#!/usr/bin/env bash
# The pytest-benchmark suites (bench_decode.py, bench_encode.py) with GPU-time rounds, saved per
# card under perf/results/<card>/ (perf/README.md, "pytest-benchmark suites").
#
#   bash perf/bench_suites.sh save NAME        record a run as perf/results/<card>/*/NNNN_NAME.json
#                                              (and copy it into $OUT when that is set)
#   bash perf/bench_suites.sh compare [ID] [--fail-pct N]
#                                              compare a new run against saved run ID (default: the
#                                              latest saved on this card); exit 1 when a median is
#                                              more than N percent (default 10) slower
#
# Extra arguments after NAME / ID go to pytest (e.g. --benchmark-json=FILE, -k decode).
# Run from the repository root with the package importable (PYTHONPATH=. on the GPU machines).
set -euo pipefail

mode=${1:-}
# Why 10: 2.6x the largest change of a median between runs of unchanged code (3.8%, H200,
# three runs with the default sustain; perf/README.md and NOTES.md, session 20)
fail_pct=10
usage="usage: perf/bench_suites.sh save NAME | compare [ID] [--fail-pct N]  (extra args go to pytest)"
if [[ $mode != save && $mode != compare ]]; then echo "$usage" >&2; exit 2; fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
card=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_')
                                      if torch.cuda.is_available() else '')")
if [[ -z $card ]]; then echo "perf/bench_suites.sh: no CUDA GPU here (the suites time GPU work)" >&2; exit 2; fi
storage="$here/results/$card"
common=(-p no:cacheprovider -o addopts= --benchmark-timer=perf.common.cuda_timer
        "--benchmark-storage=file://$storage" --benchmark-columns=median,iqr,rounds
        --benchmark-sort=fullname)
suites=("$here/bench_decode.py" "$here/bench_encode.py")

case "$mode" in
    save)
        name=${2:?usage: perf/bench_suites.sh save NAME [pytest args]}
        shift 2
        python -m pytest "${suites[@]}" "${common[@]}" "--benchmark-save=$name" "$@"
        # on the device machines only $OUT comes back: the saved run goes there too, at once
        if [[ -n ${OUT:-} ]]; then
            saved=$(ls -t "$storage"/*/*_"$name".json | head -n 1)
            cp "$saved" "$OUT"/ && echo "copied $(basename "$saved") to \$OUT"
        fi
        ;;
    compare)
        shift
        baseline=()
        if [[ $# -gt 0 && $1 != -* ]]; then baseline=("--benchmark-compare=$1"); shift
        else baseline=(--benchmark-compare); fi
        if [[ ${1:-} == --fail-pct ]]; then
            fail_pct=${2:-}
            if ! [[ $fail_pct =~ ^[0-9]+([.][0-9]+)?$ ]]; then
                echo "--fail-pct needs a number of percent, got '${fail_pct}'" >&2; exit 2
            fi
            shift 2
        fi
        if ! ls "$storage"/*/*.json >/dev/null 2>&1; then
            echo "no saved run for $card under $storage: record one with 'save NAME' first" >&2
            exit 2
        fi
        python -m pytest "${suites[@]}" "${common[@]}" "${baseline[@]}" \
            "--benchmark-compare-fail=median:${fail_pct}%" "$@"
        ;;
esac
