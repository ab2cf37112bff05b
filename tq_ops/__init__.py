"""tq_ops: TurboQuant KV-cache compression as torch.ops.turboquant.* custom ops.

    from tq_ops import TQConfig, TQCodec, preset
    codec = TQCodec.build(preset("seed", head_dim=128), device="cuda")
    records = torch.ops.turboquant.encode_keys(k, codec.rotation, codec.qjl_projection,
                                               codec.key_centroids, 2, True)
"""
from tq_ops import ops  # noqa: F401  (registers torch.ops.turboquant.*)
from tq_ops.codec import TQCodec
from tq_ops.config import DEFAULT_PRESET, PRESET_FIELDS, TQConfig, TQConfigError, preset
from tq_ops.standalone import TurboQuantAttentionImpl, TurboQuantConfig

__version__ = "0.1.0"
__all__ = ["TQCodec", "TQConfig", "TQConfigError", "TurboQuantAttentionImpl", "TurboQuantConfig",
           "preset", "PRESET_FIELDS", "DEFAULT_PRESET"]
