"""Everything that differs between the supported vLLM releases (0.26.0 .. newest), in one place.

Eras (see the project's vLLM notes):
  * 0.26 / 0.27: `get_kv_cache_shape` is required and there is no `customize_spec`, so the packed
    page size comes from a FullAttentionSpec subclass returned by a wrapper around
    `Attention.get_kv_cache_spec`;
  * 0.28 / 0.29: both `customize_spec` and `get_kv_cache_shape`;
  * 0.30+: `customize_spec` and KV-cache layouts, no `get_kv_cache_shape`;
  * 0.32+: `register_backend("NAME", path)` creates a new backend name.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import sys
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def vllm_version() -> tuple[int, int, int]:
    import vllm

    parts = []
    for piece in vllm.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def has_customize_spec() -> bool:
    from vllm.v1.attention.backend import AttentionBackend

    return hasattr(AttentionBackend, "customize_spec")


def has_named_registration() -> bool:
    """vLLM >= 0.32 turns register_backend("NAME", path) into a new enum member."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return hasattr(AttentionBackendEnum, "register") or vllm_version() >= (0, 32, 0)


def register_backend(name: str, class_path: str) -> None:
    """Point the enum member `name` at class_path, creating it if needed (named registration,
    vLLM >= 0.32).  Idempotent: a name registered before (by the entry point, or a second call)
    is overridden through its member, since registering the same new name twice raises."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend as reg

    member = AttentionBackendEnum.__members__.get(name)
    reg(member if member is not None else name, class_path)


# -- the packed page size on 0.26 / 0.27 -------------------------------------------------------

@functools.lru_cache(maxsize=None)
def legacy_spec_class():
    """FullAttentionSpec subclass whose page holds `tq_slot_bytes` per (token, KV head).

    KVCacheSpecRegistry looks managers up along the MRO, so it is managed like full attention."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class TQPagedAttentionSpec(FullAttentionSpec):
        tq_slot_bytes: int = 0

        @property
        def real_page_size_bytes(self) -> int:
            return self.block_size * self.num_kv_heads * self.tq_slot_bytes

        @classmethod
        def merge(cls, specs):
            merged = super().merge(specs)
            if any(s.tq_slot_bytes != specs[0].tq_slot_bytes for s in specs):
                raise ValueError("tq_vllm: all layers of a KV-cache group must use one format")
            return dataclasses.replace(merged, tq_slot_bytes=specs[0].tq_slot_bytes)

    TQPagedAttentionSpec.__module__ = __name__
    TQPagedAttentionSpec.__qualname__ = "TQPagedAttentionSpec"
    return TQPagedAttentionSpec


def install_legacy_spec_hook(is_ours, slot_bytes_for) -> None:
    """Wrap Attention.get_kv_cache_spec (once) so that layers whose backend `is_ours` get the
    packed spec.  Needed only where the backend has no customize_spec hook."""
    from vllm.model_executor.layers.attention import attention as attn_mod
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    cls = attn_mod.Attention
    if getattr(cls.get_kv_cache_spec, "_tq_wrapped", False):
        return
    original = cls.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or not is_ours(self.get_attn_backend()):
            return spec
        if type(spec) is not FullAttentionSpec:
            return spec  # refused earlier by validation (sliding window, MLA, ...)
        return legacy_spec_class()(
            block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
            head_size_v=spec.head_size_v, dtype=torch.uint8,
            tq_slot_bytes=slot_bytes_for(spec.head_size))

    get_kv_cache_spec._tq_wrapped = True  # type: ignore[attr-defined]
    cls.get_kv_cache_spec = get_kv_cache_spec


# -- boundary layers: vLLM's own backend for the first and last N layers ----------------------

# True while a boundary layer's backend is being chosen; a context variable rather than a flag on
# a module, so that concurrent model builds (threads) cannot see each other's choice.
_choosing_for_exact_layer: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tq_vllm_choosing_for_exact_layer", default=False)


def _selector_cache_clear() -> None:
    """vLLM caches the backend per (selected name, layer config); a boundary layer is chosen
    with no name, which on CPU with TQ_VLLM_ENABLE=1 is also how our layers are chosen, so the
    cache must not carry one choice over to the other."""
    from vllm.v1.attention import selector

    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


@contextlib.contextmanager
def _vllm_own_choice(vllm_config):
    """Inside: vLLM picks the backend it would pick with none named (and our CPU hook passes)."""
    attention_config = vllm_config.attention_config
    named = attention_config.backend
    token = _choosing_for_exact_layer.set(True)
    attention_config.backend = None
    _selector_cache_clear()
    try:
        yield
    finally:
        attention_config.backend = named
        _choosing_for_exact_layer.reset(token)
        _selector_cache_clear()


def our_backend_selected(vllm_config, our_names: tuple[str, ...], forced_on_cpu: bool) -> bool:
    """Whether vLLM will give attention layers our backend: named by --attention-backend, or
    TQ_VLLM_ENABLE=1 with no name on the CPU platform."""
    attention_config = getattr(vllm_config, "attention_config", None)
    named = getattr(attention_config, "backend", None)
    if getattr(named, "name", None) in our_names:
        return True
    return named is None and forced_on_cpu and platform_is_cpu()


def num_model_layers(vllm_config) -> int:
    model_config = vllm_config.model_config
    if hasattr(model_config, "get_total_num_hidden_layers"):
        return int(model_config.get_total_num_hidden_layers())
    return int(model_config.hf_text_config.num_hidden_layers)


def install_boundary_layer_hook(is_ours, is_boundary, selected) -> None:
    """Wrap Attention.__init__ (once): a layer for which `is_boundary(prefix, num_layers)` holds
    while `selected(vllm_config)` (our backend is the one chosen) gets the backend vLLM picks
    when none is named, with vLLM's own (exact) KV-cache spec.  vLLM keeps layers whose specs
    differ only in page size in one KV-cache group (UniformTypeKVCacheSpecs), so they share the
    block table and the capacity counts every layer's real bytes."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention import attention as attn_mod

    cls = attn_mod.Attention
    if getattr(cls.__init__, "_tq_wrapped", False):
        return
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        vllm_config = get_current_vllm_config()
        exact = False
        if selected(vllm_config):
            bound = signature.bind_partial(self, *args, **kwargs).arguments
            if bound.get("attn_backend") is None:
                exact = is_boundary(str(bound.get("prefix", "")), num_model_layers(vllm_config))
        if exact:
            with _vllm_own_choice(vllm_config):
                original(self, *args, **kwargs)
            if is_ours(self.attn_backend):
                raise ValueError(f"tq_vllm: boundary layer {self.layer_name!r} is to stay exact "
                                 f"(TQ_BOUNDARY_LAYERS) but vLLM still chose the TurboQuant "
                                 f"backend for it (a per-layer-kind backend setting?); name the "
                                 f"backend with --attention-backend only")
        else:
            original(self, *args, **kwargs)

    __init__._tq_wrapped = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


# -- the block size when several backends serve the model ------------------------------------

def install_block_size_hook(is_ours) -> None:
    """Wrap the platform's update_block_size_for_backend (once) so that, whenever our backend
    serves layers and the user gave no --block-size, the block size is the one our backend
    prefers (a multiple of the flush interval, which prefix caching needs) if every backend of
    the model supports it.  vLLM asks only the first layer's backend (0.26-0.29; on GPUs
    FlashAttention's 16 when a boundary layer comes first) or keeps its default when several
    backends accept it (0.32), and vLLM's CPU platform never asks."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(getattr(cls.update_block_size_for_backend, "__func__", None), "_tq_wrapped",
               False):
        return
    original = cls.update_block_size_for_backend  # bound classmethod

    def update_block_size_for_backend(klass, vllm_config, *args, **kwargs):
        result = original(vllm_config, *args, **kwargs)
        prefer_our_block_size(vllm_config, is_ours)
        return result

    update_block_size_for_backend._tq_wrapped = True  # type: ignore[attr-defined]
    cls.update_block_size_for_backend = classmethod(update_block_size_for_backend)


def model_backends(vllm_config) -> list:
    """The distinct attention backends of the model's layers, in layer order."""
    from vllm.config.vllm import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    out: list = []
    for layer in get_layers_from_vllm_config(vllm_config, AttentionLayerBase).values():
        backend = layer.get_attn_backend()
        if backend not in out:
            out.append(backend)
    return out


def prefer_our_block_size(vllm_config, is_ours) -> None:
    from vllm.config.vllm import set_current_vllm_config

    cache_config = vllm_config.cache_config
    if vllm_config.model_config is None or getattr(cache_config, "user_specified_block_size",
                                                     True):
        return
    backends = model_backends(vllm_config)
    ours = [b for b in backends if is_ours(b)]
    if not ours:
        return
    with set_current_vllm_config(vllm_config):
        want = ours[0].get_preferred_block_size(cache_config.block_size)
    if want == cache_config.block_size:
        return
    refusing = [b.get_name() for b in backends if not b.supports_block_size(want)]
    if refusing:
        logging.getLogger("tq_vllm").warning(
            "tq_vllm: keeping block size %d: %s cannot take %d", cache_config.block_size,
            "/".join(refusing), want)
        return
    logging.getLogger("tq_vllm").info(
        "tq_vllm: block size %d -> %d (a multiple of TQ_FLUSH_INTERVAL, for %s)",
        cache_config.block_size, want, "/".join(b.get_name() for b in backends))
    cache_config.block_size = want


# -- CPU: the platform ignores --attention-backend ---------------------------------------------

def install_cpu_selection_hook(our_names: tuple[str, ...], path_for, forced: bool,
                               check) -> None:
    """On the CPU platform, return our backend when the user selected one of `our_names` (or
    always, when `forced` by TQ_VLLM_ENABLE=1); anything else goes to vLLM's own choice.
    `check(attn_selector_config)` raises with the reasons when the layer is unsupported."""
    from vllm.platforms import cpu as cpu_mod

    cls = cpu_mod.CpuPlatform
    current = cls.__dict__.get("get_attn_backend_cls")
    if getattr(getattr(current, "__func__", current), "_tq_wrapped", False):
        return
    original = cls.get_attn_backend_cls  # bound classmethod

    def get_attn_backend_cls(klass, selected_backend, attn_selector_config, *args, **kwargs):
        name = getattr(selected_backend, "name", None)
        ours = name in our_names or (forced and selected_backend is None)
        # a boundary layer gets vLLM's own choice (install_boundary_layer_hook)
        if ours and not _choosing_for_exact_layer.get():
            check(attn_selector_config)
            return path_for(name if name in our_names else "CUSTOM")
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._tq_wrapped = True  # type: ignore[attr-defined]
    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# The FlashAttention version tq_vllm hands the decoded prefix to: FA3 is the one checked
# against our reference on a GPU (an H200, session 18); vLLM's FA2 (pre-Hopper) and FA4
# (Blackwell) take the same arguments but have not run this use, so there the Triton prefill
# kernel keeps the prefix.
FLASH_VERSION_CHECKED = 3


def flash_varlen(head_size: int) -> tuple[Any | None, str]:
    """vLLM's FlashAttention as tq_vllm.attend's `flash` argument, or None, with a line saying
    which (for the log).

    The callable takes (q, k_pages, v_pages, cu_seqlens_q, max_seqlen_q, seqused_k,
    max_seqlen_k, block_table, softmax_scale) and returns (out, lse): flash_attn_varlen_func
    with paged K/V, no causal mask and the log-sum-exp, at the FlashAttention version vLLM
    itself would pick for this head size, when that is FLASH_VERSION_CHECKED.  CUDA only:
    vLLM's CPU and ROCm builds have no such kernel here (ROCm's takes other arguments)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None, "no vLLM FlashAttention on this platform"
    try:
        from vllm.v1.attention.backends import fa_utils
    except ImportError as e:
        return None, f"vLLM's FlashAttention did not import ({e})"
    available = getattr(fa_utils, "is_flash_attn_varlen_func_available", lambda: True)
    if not available():
        return None, "vLLM reports no FlashAttention varlen kernel"
    try:
        version = fa_utils.get_flash_attn_version(head_size=head_size)
    except TypeError:  # releases whose get_flash_attn_version takes no head size
        version = fa_utils.get_flash_attn_version()
    if version != FLASH_VERSION_CHECKED:
        return None, (f"vLLM picks FlashAttention {version} here; only FA"
                      f"{FLASH_VERSION_CHECKED} (Hopper) has been checked with the paged "
                      f"decoded rows (perf/flash_prefix_gpu.py)")
    func = fa_utils.flash_attn_varlen_func
    extra = {"fa_version": version}

    def flash(q, k, v, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, block_table,
              softmax_scale):
        return func(q, k, v, max_seqlen_q=max_seqlen_q, cu_seqlens_q=cu_seqlens_q,
                    max_seqlen_k=max_seqlen_k, seqused_k=seqused_k, block_table=block_table,
                    softmax_scale=softmax_scale, causal=False, return_softmax_lse=True, **extra)

    return flash, f"vLLM FlashAttention {version}"


# -- per-request identity inside the metadata builder ------------------------------------------

def find_model_runner(max_depth: int = 40) -> Any | None:
    """The model runner that is constructing the calling metadata builder (found on the stack).

    Model runner V1 (GPU and CPU) keeps the batch's request ids in `input_batch.req_ids`; the
    builder needs them to give each request a stable raw-pool row (batch rows move)."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if obj is not None and hasattr(obj, "input_batch") and hasattr(obj, "requests"):
            return obj
        frame = frame.f_back
    return None


def batch_request_ids(runner: Any, num_reqs: int) -> list[str | None]:
    ids = list(getattr(runner.input_batch, "req_ids", []))[:num_reqs]
    return ids + [None] * (num_reqs - len(ids))


def live_request_ids(runner: Any) -> set[str]:
    return set(getattr(runner, "requests", {}).keys())


def seq_lens_cpu(cam) -> torch.Tensor:
    """(num_reqs,) host sequence lengths: exact for prefill rows (and for decode rows outside
    asynchronous speculative decoding, which the backend does not declare support for)."""
    for name in ("seq_lens_cpu_upper_bound", "seq_lens_cpu"):
        t = getattr(cam, name, None)
        if t is not None:
            return t[: cam.num_reqs]
    raise RuntimeError("tq_vllm: this vLLM gives no host copy of seq_lens")


def request_table_index(cam):
    """Model runner V2 passes each row's stable request-table index (0.32+)."""
    return getattr(cam, "req_idx", None)
