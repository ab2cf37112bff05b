"""perf/bench_suites.sh's argument checks on CPU (its pytest-benchmark runs need a GPU: they ran
on an H200, perf/README.md).  A bad mode or a machine without CUDA must stop before pytest with
exit 2 and a message, not with a traceback or an empty run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "perf" / "bench_suites.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    # the script calls `python`: this interpreter's folder first on PATH
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("args", [(), ("bogus",), ("--fail-pct", "5")],
                         ids=["no-mode", "unknown-mode", "option-first"])
def test_bad_mode_prints_usage(args):
    out = run_script(*args)
    assert out.returncode == 2
    assert "usage: perf/bench_suites.sh save NAME | compare" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("args", [("compare",), ("save", "baseline")], ids=["compare", "save"])
def test_no_gpu_stops_before_pytest(args):
    out = run_script(*args)
    assert out.returncode == 2
    assert "no CUDA GPU here" in out.stderr
    assert "pytest" not in out.stdout
