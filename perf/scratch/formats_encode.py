"""write_cache per format, write size and source tree:
`python formats_encode.py [--formats seed,k3v3,k4v4] [--tokens 32768] TREE...` runs each tree
in its own process (two rounds, alternating order) and prints us per call of the whole op,
tokens x 8 heads of fp16 K and V, with default arguments and with exact16_matrices declared.
Trees: perf/scratch/make_trees.sh (or a copy of a working tree)."""
import argparse, json, os, subprocess, sys


def one(tree, formats, tokens):
    sys.path[:0] = [tree, os.path.join(tree, "perf")]
    import common as C
    assert C.__file__.startswith(tree), C.__file__
    out = {}
    for fmt in formats:
        for tok in tokens:
            for declared in (False, True):
                op, _ = C.encode_case(tok, fmt=fmt, declared=declared)
                out[f"{fmt} {tok} {'declared' if declared else 'default'}"] = round(
                    C.gpu_ms(op, rep=200) * 1e3, 1)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="seed,k3v3,k4v4")
    ap.add_argument("--tokens", default="32768")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("trees", nargs="+")
    a = ap.parse_args()
    formats, tokens = a.formats.split(","), [int(t) for t in a.tokens.split(",")]
    if a.one:
        return one(a.trees[0], formats, tokens)
    res = {t: [] for t in a.trees}
    for rnd in range(2):
        for t in (a.trees if rnd % 2 == 0 else a.trees[::-1]):
            p = subprocess.run([sys.executable, __file__, "--one", "--formats", a.formats,
                                "--tokens", a.tokens, os.path.abspath(t)],
                               capture_output=True, text=True, cwd=t)
            line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(t, "failed", p.stderr[-2000:])
                continue
            res[t].append(json.loads(line[0][7:]))
    for t, rs in res.items():
        for case in (rs[0] if rs else {}):
            print(f"{os.path.basename(os.path.abspath(t)):10s} {case:28s} {[r[case] for r in rs]}")


if __name__ == "__main__":
    main()
