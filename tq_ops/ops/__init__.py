"""Importing this package registers every torch.ops.turboquant.* op (one file per op)."""
from tq_ops.ops.attention import attention
from tq_ops.ops.encode_keys import encode_keys
from tq_ops.ops.encode_values import encode_values
from tq_ops.ops.key_scores import key_scores
from tq_ops.ops.mse_dequantize import mse_dequantize
from tq_ops.ops.mse_quantize import mse_quantize
from tq_ops.ops.paged_decode_attention import paged_decode_attention
from tq_ops.ops.paged_dequantize import paged_dequantize
from tq_ops.ops.paged_prefill_attention import paged_prefill_attention
from tq_ops.ops.paged_prefill_prefix import paged_prefill_prefix
from tq_ops.ops.qjl_sketch import qjl_sketch
from tq_ops.ops.rotate import rotate, unrotate
from tq_ops.ops.write_cache import write_cache
from tq_ops.ops.write_raw import write_raw

__all__ = ["attention", "encode_keys", "encode_values", "key_scores", "mse_dequantize",
           "mse_quantize", "paged_decode_attention", "paged_dequantize",
           "paged_prefill_attention", "paged_prefill_prefix", "qjl_sketch", "rotate", "unrotate", "write_cache",
           "write_raw"]
