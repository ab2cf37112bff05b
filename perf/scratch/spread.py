import sys, os, subprocess
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
import common as C
def clocks():
    return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
case = C.decode_case(8, 32768, block_size=int(sys.argv[1]) if len(sys.argv) > 1 else 64)
fn, _ = C.sdpa_case(8, 32768)
print("pid", os.getpid(), "before", clocks())
print("ours", [round(C.gpu_ms(case.run, rep=100), 4) for _ in range(3)], "sdpa", round(C.gpu_ms(fn, rep=100), 4), "after", clocks(), flush=True)
