import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if "variant" not in r:
        continue
    k = r["kernels_us"]
    ks = " ".join(f"{n.split('_kernel')[0][-12:]}={v}" for n, v in k.items()) if isinstance(k, dict) else str(k)
    print(f"{r['batch']} {r['ctx']} {json.dumps(r['variant']):45s} op {r['op_ms']:.4f} diff {r['rel_diff']:.1e} | {ks}")
