"""Run the write_cache op at one size, for a profiler to attach (GPU).

    ncu --clock-control none --kernel-name regex:encode_ --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats ... python perf/profile_encode.py [tokens [declared]]

tokens x 8 KV heads of fp16 K and V, seed format, head_dim 128; the first call compiles.
declared (default 1): the op with exact16_matrices=True, the vLLM backend's call, which takes
the EXACT16 kernels from tq_ops.triton.encode.EXACT16_MIN_ROWS rows up; there each op call is
one joint launch of encode_pair_kernel (keys, then values, per program: skip 1 and count 1
launch per call), and with default arguments the key encode_kernel launch and then the value
one.  perf/NOTES.md has the readings.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402


def main() -> int:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else C.ENCODE_TOKENS
    declared = bool(int(sys.argv[2])) if len(sys.argv) > 2 else True
    run, _ = C.encode_case(tokens, declared=declared)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
