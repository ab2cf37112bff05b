import sys
sys.argv=[sys.argv[0]]
import perf.sass_report as S
k = S.compile_split("seed", 128, 4, 128, 64, 1, 2, 0, True, False, False)
w = S.hot_loop(k.asm["cubin"], whole=True)
h = S.hot_loop(k.asm["cubin"])
print("whole", len(w), "loop", len(h), "outside loop", len(w)-len(h))
