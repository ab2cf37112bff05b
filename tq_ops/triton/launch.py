"""Device facts the fixed launch configs are keyed by.

No autotuning anywhere: a kernel that may be captured in a CUDA graph must launch the same way on
every call, so each family keeps a table keyed by (arch, head_dim, bits) and falls back to a
conservative default row for keys it does not list.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _props(index: int) -> tuple[str, int]:
    p = torch.cuda.get_device_properties(index)
    return f"sm{p.major}{p.minor}", p.multi_processor_count


def arch(device: torch.device) -> str:
    """'sm90' for an H100/H200, 'sm80' for an A100, ...; 'cpu' off CUDA (interpreter tests)."""
    if device.type != "cuda":
        return "cpu"
    return _props(device.index if device.index is not None else torch.cuda.current_device())[0]


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _props(device.index if device.index is not None else torch.cuda.current_device())[1]
