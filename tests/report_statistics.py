"""Print the measured-vs-theory table of algorithm.md section 7 (the numbers the property tests
assert), for the closing note.  Same functions and seeds as the tests (tests/stats.py).

    python tests/report_statistics.py          (about half a minute on one CPU core)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed

import torch  # noqa: E402

import stats as S  # noqa: E402
from paper_tables import PROD_VARIANCE_128, d_mse  # noqa: E402

D = 128


def row(name: str, measured: float, se: float, theory: float, tol: str) -> str:
    return f"| {name} | {measured:.5f} ± {se:.5f} | {theory:.5f} | {measured / theory:.4f} | {tol} |"


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    print(f"d = {D}, CPU reference ops (torch {torch.__version__})\n")
    print("| quantity | measured ± SE | theory | ratio | tolerance |")
    print("|---|---|---|---|---|")
    for b in (1, 2, 3, 4):
        m, se = S.mse_random(D, b)
        print(row(f"MSE b={b} (10 000 unit vectors, 1 rotation)", m, se, d_mse(D, b), "±2%"))
    for b in (1, 2, 3, 4):
        m, se = S.prod_variance(D, b)
        print(row(f"prod d·E[err²] b={b} ({b - 1} MSE + 1 QJL bit; 20 000 pairs, 10 seeds)",
                  m, se, PROD_VARIANCE_128[b], "±10%"))
    for b in (1, 2, 3, 4):
        m, se = S.prod_slope(D, b)
        print(row(f"prod regression slope b={b} (8 000 pairs, 8 seeds)", m, se, 1.0, "±0.01"))
    for b in (1, 2, 3, 4):
        m, se = S.mse_bias_slope(D, b)
        print(row(f"MSE bias slope b={b} (8 000 pairs)", m, se, 1 - d_mse(D, b), "±0.01"))
    for mb in (1, 2, 3):
        m, se = S.qjl_term_slope(D, mb)
        print(row(f"QJL term slope, one S' fixed, {mb} MSE bits (4 000 pairs)", m, se, 1.0,
                  "±0.02"))
    m, se = S.qjl_term_slope(D, 2, transposed_query=True)
    print(f"| QJL slope with S'^T on the query side (the seed's bug; control) | {m:.5f} ± {se:.5f}"
          f" | ~1/d = {1 / D:.5f} | – | must fail the ±0.02 test |")
    adv = S.mse_adversarial(D, (1, 2, 3, 4), range(1000))
    print("\nAdversarial inputs, d = 128, mean MSE over 1000 rotation seeds / theory "
          "(must be <= 1.06; SE in brackets):\n")
    names = sorted({k[0] for k in adv}, key=list(S.adversarial_inputs(D)).index)
    print("| input | " + " | ".join(f"b={b}" for b in (1, 2, 3, 4)) + " |")
    print("|---|---|---|---|---|")
    worst = {}
    for name in names:
        cells = []
        for b in (1, 2, 3, 4):
            m, se = S.mean_se(adv[(name, b)])
            r = m / d_mse(D, b)
            if r > worst.get(b, (0.0, ""))[0]:
                worst[b] = (r, name)
            cells.append(f"{r:.3f} ({se / m:.1%})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nWorst case per b: " + ", ".join(f"b={b}: {worst[b][0]:.3f}x ({worst[b][1]})"
                                             for b in (1, 2, 3, 4)))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
