"""A/B of the decode-step write: the session-6 encode kernel (S' gathered) against the current."""
import sys, os, json
from unittest import mock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import tune_small_launches as T
import encode_old
import tq_ops.ops.write_cache  # noqa
mod = sys.modules["tq_ops.ops.write_cache"]
for r in range(2):
    for name in ("old", "new"):
        print(name, end=" ")
        if name == "old":
            with mock.patch.object(mod, "encode_pair_kernel", encode_old.encode_pair_kernel), \
                 mock.patch.object(mod, "encode_kernel", encode_old.encode_kernel):
                T.decode_write(24)
        else:
            T.decode_write(24)
