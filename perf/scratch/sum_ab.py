import json, sys
raw = json.load(open(sys.argv[1]))
for r in raw:
    res = r["result"] or {}
    print(r["round"], r["build"], r["config"], res.get("tpot_ms"), res.get("kv_tokens"),
          res.get("cudagraph_mode"), "fwd_calls", res.get("tq_forward_calls_timed"),
          "compiled", res.get("compiled_during_decode"))
    for row in res.get("kernel_profile", [])[:9]:
        print("    ", row)
