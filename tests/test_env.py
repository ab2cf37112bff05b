"""The seed's TQ_* environment variables (tq_ops._env) and TurboQuantConfig.from_env."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from tq_ops import TQConfigError, TurboQuantAttentionImpl, TurboQuantConfig, _env

# The seed's names and defaults (its README), not read from the code under test.
SEED_DEFAULTS = {"TQ_B_MSE": ("b_mse", 2), "TQ_B_QJL": ("b_qjl", 1),
                 "TQ_FLUSH_INTERVAL": ("flush_interval", 128), "TQ_NUM_LAYERS": ("num_layers", 32),
                 "TQ_NUM_HEADS": ("num_heads", 32), "TQ_NUM_KV_HEADS": ("num_kv_heads", 32),
                 "TQ_HEAD_DIM": ("head_dim", 128), "TQ_MAX_SEQ_LEN": ("max_seq_len", 4096),
                 "TQ_DEVICE": ("device", "cuda")}


def test_defaults_are_the_seeds():
    values = _env.read_env({})
    cfg = TurboQuantConfig.from_env({})
    for var, (field, default) in SEED_DEFAULTS.items():
        assert values[field] == default, var
        assert getattr(cfg, field) == default, var
    assert cfg == TurboQuantConfig()


def test_process_environment_is_read(monkeypatch):
    for var in [v.name for v in _env.ENV_VARS]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TQ_B_MSE", "3")
    monkeypatch.setenv("TQ_B_QJL", "0")
    monkeypatch.setenv("TQ_NUM_KV_HEADS", "8")
    monkeypatch.setenv("TQ_HEAD_DIM", "64")
    monkeypatch.setenv("TQ_DEVICE", "cpu")
    cfg = TurboQuantConfig.from_env()
    assert (cfg.b_mse, cfg.b_qjl, cfg.num_kv_heads, cfg.head_dim, cfg.device) == \
        (3, 0, 8, 64, "cpu")
    assert cfg.tq_config.key_mse_bits == 3 and not cfg.tq_config.use_qjl


@pytest.mark.parametrize("var,raw,field,value", [
    ("TQ_B_MSE", "4", "b_mse", 4), ("TQ_B_QJL", "0", "b_qjl", 0),
    ("TQ_FLUSH_INTERVAL", "0", "flush_interval", 0), ("TQ_NUM_LAYERS", " 2 ", "num_layers", 2),
    ("TQ_NUM_HEADS", "64", "num_heads", 64), ("TQ_NUM_KV_HEADS", "4", "num_kv_heads", 4),
    ("TQ_HEAD_DIM", "96", "head_dim", 96), ("TQ_MAX_SEQ_LEN", "1", "max_seq_len", 1),
    ("TQ_DEVICE", "cuda:1", "device", "cuda:1"), ("TQ_DEVICE", "cpu", "device", "cpu"),
])
def test_each_variable_overrides_its_field(var, raw, field, value):
    assert getattr(TurboQuantConfig.from_env({var: raw}), field) == value


def test_preset_sets_bits_and_explicit_variables_win():
    cfg = TurboQuantConfig.from_env({"TQ_PRESET": "k4v3"})
    assert (cfg.b_mse, cfg.b_qjl, cfg.value_bits) == (4, 0, 3)
    cfg = TurboQuantConfig.from_env({"TQ_PRESET": "k4v3", "TQ_B_MSE": "2"})
    assert (cfg.b_mse, cfg.b_qjl) == (2, 0)


@pytest.mark.parametrize("environ,pieces", [
    ({"TQ_B_MSE": "9"}, ["TQ_B_MSE", "'9'", "1..4"]),
    ({"TQ_B_MSE": "0"}, ["TQ_B_MSE", "'0'", "1..4"]),
    ({"TQ_B_QJL": "2"}, ["TQ_B_QJL", "'2'", "0 or 1"]),
    ({"TQ_NUM_HEADS": "32", "TQ_NUM_KV_HEADS": "5"}, ["TQ_NUM_HEADS=32", "TQ_NUM_KV_HEADS=5",
                                                       "divide"]),
    ({"TQ_HEAD_DIM": "0"}, ["TQ_HEAD_DIM", "'0'", "multiple of 16"]),
    ({"TQ_HEAD_DIM": "72"}, ["TQ_HEAD_DIM", "'72'", "multiple of 16"]),
    ({"TQ_HEAD_DIM": "abc"}, ["TQ_HEAD_DIM", "'abc'", "multiple of 16"]),
    ({"TQ_B_MSE": "2.5"}, ["TQ_B_MSE", "'2.5'", "1..4"]),
    ({"TQ_FLUSH_INTERVAL": "-1"}, ["TQ_FLUSH_INTERVAL", "'-1'", ">= 0"]),
    ({"TQ_NUM_LAYERS": ""}, ["TQ_NUM_LAYERS", "''", ">= 1"]),
    ({"TQ_MAX_SEQ_LEN": "lots"}, ["TQ_MAX_SEQ_LEN", "'lots'", ">= 1"]),
    ({"TQ_DEVICE": "tpu"}, ["TQ_DEVICE", "'tpu'", "cuda"]),
    ({"TQ_PRESET": "k9"}, ["TQ_PRESET", "'k9'", "seed"]),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else "")
def test_bad_values_name_variable_value_and_range(environ, pieces):
    for reader in (_env.read_env, TurboQuantConfig.from_env):
        with pytest.raises(TQConfigError) as err:
            reader(environ)
        for p in pieces:
            assert p in str(err.value), f"{p!r} missing from: {err.value}"


@pytest.mark.parametrize("var", [v.name for v in _env.ENV_VARS
                                 if v.name not in ("TQ_DEVICE", "TQ_PRESET")])
def test_every_numeric_variable_rejects_a_non_number(var):
    with pytest.raises(TQConfigError, match=rf"{var}='x12' is invalid: expected"):
        _env.read_env({var: "x12"})


def test_cuda_device_falls_back_to_cpu_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = TurboQuantConfig.from_env({"TQ_NUM_HEADS": "4", "TQ_NUM_KV_HEADS": "2",
                                     "TQ_HEAD_DIM": "64"})
    assert cfg.device == "cuda"
    with pytest.warns(RuntimeWarning, match="TQ_DEVICE=cuda but no CUDA GPU"):
        assert cfg.resolved_device() == torch.device("cpu")
    with pytest.warns(RuntimeWarning):
        impl = TurboQuantAttentionImpl(4, 64, 0.125, 2, cfg)
    assert impl.device == torch.device("cpu")
    out = impl.forward(torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64))
    assert out.shape == (2, 4, 64)


def test_cpu_device_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TurboQuantConfig.from_env({"TQ_DEVICE": "cpu"}).resolved_device().type == "cpu"


def test_only_env_module_reads_tq_variables():
    """style: environment variables are read only in tq_ops/_env.py."""
    root = Path(__file__).resolve().parents[1] / "tq_ops"
    pattern = re.compile(r"""(getenv|environ\.get|environ\[)\(?\s*["']TQ_""")
    offenders = [str(p.relative_to(root.parent)) for p in root.rglob("*.py")
                 if p.name != "_env.py" and pattern.search(p.read_text())]
    assert not offenders, offenders


def test_prefill_flash_switch():
    assert _env.prefill_flash_enabled({}) is True
    assert _env.prefill_flash_enabled({"TQ_PREFILL_FLASH": "0"}) is False
    assert _env.prefill_flash_enabled({"TQ_PREFILL_FLASH": " 1 "}) is True
    with pytest.raises(TQConfigError, match="TQ_PREFILL_FLASH='on' is invalid: expected 0 or 1"):
        _env.prefill_flash_enabled({"TQ_PREFILL_FLASH": "on"})
