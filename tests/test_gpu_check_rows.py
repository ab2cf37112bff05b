"""perf/gpu_check.py's bench rows on CPU: the device machines end a command at 10 minutes,
and whatever the bench phase measured before that must already be in bench.json (a call cut
short in session 30 lost its rows)."""
from __future__ import annotations

import json

import pytest

from helpers import perf_script


@pytest.fixture
def gpu_check(monkeypatch):
    return perf_script(monkeypatch, "gpu_check")


def test_each_row_is_in_bench_json_when_it_is_emitted(gpu_check, tmp_path, capsys):
    rows = gpu_check.BenchRows(str(tmp_path))
    rows.emit(dict(kind="copy", bw=4.2e12))
    assert json.loads((tmp_path / "bench.json").read_text()) == [dict(kind="copy", bw=4.2e12)]
    rows.emit(dict(kind="encode", ms=0.139))
    assert [r["kind"] for r in json.loads((tmp_path / "bench.json").read_text())] == \
        ["copy", "encode"]
    assert rows == [dict(kind="copy", bw=4.2e12), dict(kind="encode", ms=0.139)]
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("BENCH ")]
    assert [json.loads(ln[6:])["kind"] for ln in printed] == ["copy", "encode"]


def test_rows_without_an_out_dir_are_printed_only(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = gpu_check.BenchRows(None)
    rows.emit(dict(kind="copy", bw=1.0))
    assert rows == [dict(kind="copy", bw=1.0)] and not list(tmp_path.iterdir())
    assert capsys.readouterr().out.startswith("BENCH ")
