"""Theoretical values the tests compare against, transcribed from the project's algorithm notes
(sections 1.4, 1.5, 1.6, 2.3 and 7), which derive them from the TurboQuant paper.  Never computed
by the code under test.  The oracle's own Lloyd-Max solver reproduces them
(tests/test_codebooks.py), which checks the transcription too."""
from __future__ import annotations

import math

# Table 1a: Lloyd-Max for N(0,1), non-negative half: centroids, boundaries, D_mse.
TABLE_1A = {
    1: ((0.797885,), (0.0,), 0.363380),
    2: ((0.452780, 1.510418), (0.0, 0.981599), 0.117482),
    3: ((0.245094, 0.756005, 1.343909, 2.151946), (0.0, 0.500550, 1.049957, 1.747927), 0.034548),
    4: ((0.128395, 0.388048, 0.656759, 0.942340, 1.256231, 1.618046, 2.069017, 2.732590),
        (0.0, 0.258222, 0.522404, 0.799550, 1.099286, 1.437139, 1.843532, 2.400803), 0.009501),
}

# Table 1b: exact sphere marginal at dimension d: D_mse for b = 1..4, and the largest b=4
# centroid times sqrt(d).
TABLE_1B = {
    32: ((0.35336, 0.11160, 0.03226, 0.00877), 2.565),
    64: ((0.35839, 0.11453, 0.03339, 0.00913), 2.646),
    80: ((0.35939, 0.11511, 0.03362, 0.00920), 2.663),
    96: ((0.36006, 0.11551, 0.03377, 0.00925), 2.675),
    112: ((0.36053, 0.11579, 0.03388, 0.00929), 2.683),
    128: ((0.36089, 0.11600, 0.03397, 0.00931), 2.689),
    256: ((0.36214, 0.11674, 0.03426, 0.00941), 2.711),
    576: ((0.36283, 0.11715, 0.03442, 0.00946), 2.723),
}

# d = 128 Beta-optimal centroids x sqrt(d), non-negative half.
BETA_128_CENTROIDS = {
    2: (0.4525, 1.5052),
    3: (0.2444, 0.7533, 1.3366, 2.1315),
    4: (0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889),
}


def d_mse(d: int, b: int) -> float:
    """Theoretical D_mse of a unit vector (Table 1b)."""
    return TABLE_1B[d][0][b - 1]


def mse_bounds(b: int) -> tuple[float, float]:
    """Paper Thm 3 lower bound 4^-b and Thm 1 upper bound (sqrt(3) pi / 2) 4^-b."""
    return 4.0 ** -b, math.sqrt(3) * math.pi / 2 * 4.0 ** -b


# Section 7.8: d * E[(est - <x,y>)^2] of TurboQuant_prod with b total bits (b-1 MSE + 1 QJL),
# random unit x and y, d = 128.
PROD_VARIANCE_128 = {1: 1.56, 2: 0.567, 3: 0.182, 4: 0.0534}

# Section 7.11: bytes per key record at d = 128.
KEY_BYTES_128 = {"prod-3 (2 MSE + 1 QJL)": (2, True, 52), "mse-3": (3, False, 50),
                 "mse-4": (4, False, 66)}
