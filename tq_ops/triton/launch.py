"""Device facts the fixed launch configs are keyed by.

No autotuning anywhere: a kernel that may be captured in a CUDA graph must launch the same way on
every call, so each family keeps a table keyed by (arch, head_dim, bits) and falls back to a
conservative default row for keys it does not list.

Run-time values never select a compiled variant.  Triton specialises a kernel on each integer
argument (== 1, divisible by 16) and on each pointer's 16-byte alignment, and compiles a new
variant the first time a launch differs.  On the serving path the token count, the sequence and
split counts and the offsets of sliced metadata change from step to step, so every kernel a
serving step launches eagerly declares those arguments in `do_not_specialize` /
`do_not_specialize_on_alignment` (they are counts and scalar loads, where the specialisation buys
nothing).  perf/gpu_check.py checks it ("no recompiles on run-time values").  A vLLM prefill of
eight 32k prompts on an H200 had stalled for 27 s and 24 s in two of its eighteen steps before
this (perf/NOTES.md, session 5), which is what mid-serving compiles of these kernels look like.

Register caps.  A table row may cap a kernel's registers per thread (Triton's `maxnreg` launch
option) to keep more programs resident than ptxas would on its own.  torch.compile's tracing of
`wrap_triton` launches rejects launch options it does not know (torch 2.11-2.13), so the cap is
passed only to launches that run eagerly (`register_cap`).  A traced decode launch takes the
decoders that need no cap (the PRMT tables, session 5's kernel: 168 registers on their own), so
its split count still fills whole waves; eager and compiled decode then differ by operand
rounding only, within the same tolerance against the reference.  vLLM runs the ops eagerly
inside its CUDA graphs, so it gets the cap.
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


def has_bulk_prefetch(arch_name: str) -> bool:
    """Whether an arch (as `arch` names it) has PTX's cp.async.bulk.prefetch (sm_90 and later):
    the decode split kernel's L2 hint (tq_ops.triton.decode.attend_pages) compiles only there."""
    return arch_name.startswith("sm") and int(arch_name[2:-1]) >= 9


def register_cap(max_registers: int) -> dict:
    """{"maxnreg": max_registers} for a launch that runs eagerly, {} while torch is tracing
    wrap_triton launches (module docstring) or when no cap is set."""
    if not max_registers:
        return {}
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # a torch without the switch: never risk a rejected launch option
        return {}
    return {} if is_wrap_triton_enabled() else {"maxnreg": max_registers}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _props(device.index if device.index is not None else torch.cuda.current_device())[1]
