"""Offline sm_90 compile of the EXACT16 encode launch (seed format, head_dim 128, 64 rows, 4 warps):
instructions of the whole kernel, of its tile loop and outside it, shared memory, and the loop's
opcodes.  `PYTHONPATH=. python perf/scratch/enc_pro.py keys|values [num_stages]`."""
import collections, sys
from unittest import mock
sys.path.insert(0, 'perf')
import sass_report as S
part = sys.argv[1] if len(sys.argv) > 1 else "keys"
stages = int(sys.argv[2]) if len(sys.argv) > 2 else 3
orig = S.compile_sm90
def patched(*a, **kw):
    kw["num_stages"] = stages
    return orig(*a, **kw)
with mock.patch.object(S, "compile_sm90", patched):
    k = S.compile_encode("seed", 128, part, 64, 4, 0, exact16=True)
sass = S.hot_loop(k.asm["cubin"], whole=True)
body = S.hot_loop(k.asm["cubin"])
ops = collections.Counter(S.opcode(t) for t in sass)
bops = collections.Counter(S.opcode(t) for t in body)
outside = {o: n - bops.get(o, 0) for o, n in ops.items() if n - bops.get(o, 0)}
print(part, "stages", stages, "whole", len(sass), "loop", len(body), "outside", sum(outside.values()),
      "smem", k.metadata.shared)
print(sorted(bops.items(), key=lambda t: -t[1])[:22])
