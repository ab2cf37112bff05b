"""Argument checks shared by the ops. Static properties only (dtype, device, rank, sizes), so they
trace under torch.compile without graph breaks; a failure names the argument and what was wanted."""
from __future__ import annotations

import torch
from torch import Tensor

from tq_ops import capabilities

FLOAT_DTYPES = capabilities.INPUT_DTYPES


class TQInputError(ValueError):
    """An op argument has the wrong dtype, rank, size or device."""


def fail(msg: str) -> None:
    raise TQInputError(msg)


def floats(name: str, x: Tensor, rank: int | None = None, min_rank: int = 1) -> None:
    if not isinstance(x, Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        fail(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if rank is not None and x.dim() != rank:
        fail(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dim() < min_rank:
        fail(f"{name} must have rank >= {min_rank}, got shape {tuple(x.shape)}")


def uint8(name: str, x: Tensor, rank: int | None = None) -> None:
    if x.dtype != torch.uint8:
        fail(f"{name} must be uint8 packed bytes, got {x.dtype}")
    if rank is not None and x.dim() != rank:
        fail(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def ints(name: str, x: Tensor, rank: int) -> None:
    if x.dtype not in (torch.int32, torch.int64):
        fail(f"{name} must be int32 or int64, got {x.dtype}")
    if x.dim() != rank:
        fail(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")


def head_dim(name: str, x: Tensor, d: int) -> None:
    if x.shape[-1] != d:
        fail(f"{name} has last dim {x.shape[-1]} but the rotation is {d}x{d}")


def rotation(rot: Tensor, name: str = "rotation") -> int:
    if not isinstance(rot, Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(rot).__name__}")
    if rot.dim() != 2 or rot.shape[0] != rot.shape[1] or rot.dtype != torch.float32:
        fail(f"{name} must be a square fp32 matrix, got {tuple(rot.shape)} {rot.dtype}")
    problems = capabilities.head_dim_problems(int(rot.shape[0]))
    if problems:
        fail(f"{name} is {tuple(rot.shape)}: {problems[0]}")
    return int(rot.shape[0])


def projection(proj: Tensor, d: int) -> None:
    """The QJL matrix S': (D, D) fp32 like the rotation."""
    if not isinstance(proj, Tensor):
        fail(f"projection must be a torch.Tensor, got {type(proj).__name__}")
    if tuple(proj.shape) != (d, d) or proj.dtype != torch.float32:
        fail(f"projection must be an fp32 ({d}, {d}) matrix like the rotation, got "
             f"{tuple(proj.shape)} {proj.dtype}")


def codebook(name: str, centroids: Tensor, bits: int) -> None:
    """name: "key" / "value" for the ops' key_centroids/key_bits and value_centroids/value_bits
    arguments; anything else (the op name) for plain centroids/bits."""
    c_arg, b_arg = (f"{name}_centroids", f"{name}_bits") if name in ("key", "value") else \
        ("centroids", "bits")
    lo, hi = capabilities.MSE_BITS_RANGE
    if not lo <= bits <= hi:
        fail(f"{b_arg}={bits} is outside {lo}..{hi}")
    if centroids.dim() != 1 or centroids.shape[0] != 2**bits or centroids.dtype != torch.float32:
        fail(f"{c_arg} must be fp32 of shape ({2**bits},) for {b_arg}={bits}, got "
             f"{tuple(centroids.shape)} {centroids.dtype}")


def same_device(**tensors: Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(dv != first for dv in devices.values()):
        fail("all tensors must be on one device, got " +
             ", ".join(f"{n}={dv}" for n, dv in devices.items()))


def records(name: str, x: Tensor, nbytes: int) -> None:
    uint8(name, x)
    if x.dim() < 1:
        fail(f"{name} must have rank >= 1 (..., {nbytes} bytes), got a scalar")
    if x.shape[-1] != nbytes:
        fail(f"{name} last dim must be {nbytes} bytes for this format, got {x.shape[-1]}")


def gqa(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        fail(f"query heads ({num_heads}) must be a positive multiple of KV heads ({num_kv_heads})")
