"""tq_vllm: a vLLM V1 attention backend that keeps TurboQuant-compressed K/V in vLLM's paged
blocks, with the seed's flush buffer (exact newest tokens) and exact sink tokens.

vLLM loads `register` through the `vllm.general_plugins` entry point in every process.  Installing
the package changes nothing until the backend is selected:

    LLM(model, attention_backend="CUSTOM")       # every vLLM >= 0.26 (also --attention-backend)
    LLM(model, attention_backend="TQ_KV")        # vLLM >= 0.32, a name of its own
    TQ_VLLM_ENABLE=1                             # use it without naming it (e.g. vLLM's CPU
                                                 # platform, which ignores --attention-backend)

The format comes from the TQ_* variables (TQ_PRESET, TQ_B_MSE, TQ_B_QJL, TQ_VALUE_BITS,
TQ_FLUSH_INTERVAL, TQ_SINK_TOKENS, TQ_SEED); head_dim and KV heads from the model.
TQ_BOUNDARY_LAYERS=N leaves the first and last N layers exact, served by the backend vLLM would
pick itself, in the same KV-cache group (one block table; capacity counts their larger pages).
"""
from __future__ import annotations

BACKEND_PATH = "tq_vllm.backend.TQAttentionBackend"
NAMED_BACKEND_PATH = "tq_vllm.backend.TQKVBackend"
BACKEND_NAME = "TQ_KV"


def _path_for(name: str) -> str:
    return NAMED_BACKEND_PATH if name == BACKEND_NAME else BACKEND_PATH


def register() -> None:
    """Register the backend with vLLM (idempotent; vLLM calls it once per process)."""
    from tq_ops import _env
    from tq_vllm import compat

    # vLLM logs and swallows a plugin's exception, so a bad TQ_VLLM_ENABLE must not raise here:
    # it is raised when the backend is chosen, which fails the engine start with this message.
    env_error = None
    try:
        forced = _env.vllm_enabled()
    except ValueError as exc:
        forced, env_error = True, exc
    compat.register_backend("CUSTOM", BACKEND_PATH)
    names = ("CUSTOM",)
    if compat.has_named_registration():
        compat.register_backend(BACKEND_NAME, NAMED_BACKEND_PATH)
        names += (BACKEND_NAME,)
    if not compat.has_customize_spec():
        compat.install_legacy_spec_hook(_is_ours, _slot_bytes)
    compat.install_block_size_hook(_is_ours)
    compat.install_boundary_layer_hook(
        _is_ours, _is_boundary_layer,
        lambda vllm_config: compat.our_backend_selected(vllm_config, names, forced))
    if compat.platform_is_cpu():
        compat.install_cpu_selection_hook(names, _path_for, forced,
                                          _checker(env_error))
    elif env_error is not None:
        _log().error("%s", env_error)
    elif forced:
        _warn_forced_needs_selection()


def _is_ours(backend_cls) -> bool:
    from tq_vllm.backend import _is_ours as ours

    return ours(backend_cls)


def _is_boundary_layer(prefix: str, num_layers: int) -> bool:
    from tq_vllm.config import is_boundary_layer

    return is_boundary_layer(prefix, num_layers)


def _slot_bytes(head_size: int) -> int:
    from tq_vllm.config import format_for

    return format_for(head_size).slot_bytes


def _checker(env_error):
    def check(sel) -> None:
        if env_error is not None:
            raise env_error
        from tq_vllm.backend import check_selector_config

        check_selector_config(sel)

    return check


def _log():
    import logging

    return logging.getLogger("tq_vllm")


def _warn_forced_needs_selection() -> None:
    _log().warning(
        "TQ_VLLM_ENABLE=1 only replaces the backend on vLLM's CPU platform; on GPUs select it "
        "with --attention-backend CUSTOM (or TQ_KV on vLLM >= 0.32)")
