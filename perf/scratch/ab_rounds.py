"""The driver of the perf/scratch A/B scripts: `run_rounds(script, trees)` runs
`python script one TREE` for each tree in its own process (so each imports its own tq_ops),
two rounds in alternating order, and prints each case's values per tree.  A run reports one
line "RESULT {json}"; a run without it prints its stderr tail."""
import json, os, subprocess, sys


def run_rounds(script, trees, rounds=2, width=16):
    res = {t: [] for t in trees}
    for rnd in range(rounds):
        for t in (trees if rnd % 2 == 0 else trees[::-1]):
            p = subprocess.run([sys.executable, script, "one", os.path.abspath(t)],
                               capture_output=True, text=True, cwd=t)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(t, "failed", p.stderr[-2000:]); continue
            res[t].append(json.loads(line[0][7:]))
    for t, rs in res.items():
        for case in (rs[0] if rs else {}):
            print(f"{os.path.basename(os.path.abspath(t)):{width}s} {case:36s} "
                  f"{[r[case] for r in rs]}")


def cli(one, script, width=16):
    """A script's entry point: `script one TREE` times that tree (one(tree)); `script TREE...`
    runs the rounds."""
    if sys.argv[1] == "one":
        one(sys.argv[2])
    else:
        run_rounds(os.path.abspath(script), sys.argv[1:], width=width)
