import sys
sys.path.insert(0, '.'); sys.path.insert(0, 'perf')
import sass_report as S
k = S.compile_encode('seed', 128, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 0)
body = S.hot_loop(k.asm['cubin'])
print('\n'.join(body))
