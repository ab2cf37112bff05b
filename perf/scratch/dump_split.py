import sys, collections
tag = sys.argv[1] if len(sys.argv) > 1 else "x"
sys.argv=[sys.argv[0]]
sys.path.insert(0,'perf')
import sass_report as S
from tq_ops.triton.decode import decode_config
mx = decode_config("sm90",128,2).max_registers
k = S.compile_split("seed",128,4,64,64,1,2,mx,True,True,True)
for l in S.ptxas_summary(k.asm["ptx"]): print(l)
body = S.hot_loop(k.asm["cubin"])
open(f'/tmp/split_hot_{tag}.sass','w').write("\n".join(body))
c = collections.Counter(S.opcode(t) for t in body)
alu = sum(n for op,n in c.items() if op.split('.')[0] in ('LOP3','PRMT','SHF','LEA','IADD3','FSEL','FMNMX','ISETP','SEL','VIADD','SGXT','FSETP'))
fma = sum(n for op,n in c.items() if op.split('.')[0] in ('IMAD','FMUL','FADD','FFMA','HADD2','HFMA2','HMUL2'))
print(tag, "total", len(body), "alu~", alu, "fma~", fma)
print(", ".join(f"{op} {n}" for op,n in c.most_common(30)))
