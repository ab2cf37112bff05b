import collections, sys
sys.argv=['x']
sys.path.insert(0,'perf')
import sass_report as S
k = S.compile_encode("seed", 128, sys.argv[1] if len(sys.argv)>1 else "keys", 64, 4, 0)
sass = S.hot_loop(k.asm["cubin"], whole=True)
body = S.hot_loop(k.asm["cubin"])
ops = collections.Counter(S.opcode(t) for t in sass)
bops = collections.Counter(S.opcode(t) for t in body)
print(len(sass), len(body))
print({o: n - bops.get(o,0) for o,n in ops.items() if o.startswith(("LD","ST","BAR"))})
