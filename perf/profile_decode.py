"""Run the paged decode op at one shape, for a profiler to attach (GPU).

    ncu --clock-control none --kernel-name regex:decode_split --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats ... python perf/profile_decode.py 8 32768 [page [raw tokens]]

Each op call launches the query prep, the split kernel and the merge (the fallback merge, with
its codebook check, since the op's default does not declare the built-in codebooks); the first
call compiles.  perf/NOTES.md has the readings.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402


def main() -> int:
    batch, ctx = int(sys.argv[1]), int(sys.argv[2])
    page = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    raw = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    case = C.decode_case(batch, ctx, block_size=page, raw_tokens=raw)
    for _ in range(3):
        case.run()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
