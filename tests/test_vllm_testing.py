"""Helpers of the vLLM end-to-end tests that need no vLLM (run in the main CPU suite)."""
from __future__ import annotations

import math

import pytest

from tq_vllm.testing import greedy_divergence

# the reference's greedy [5, 6, 7] and each step's candidates, largest logit first
REF = [5, 6, 7]
TOP = [[[5, 3.0], [9, 2.5]], [[6, 1.0], [8, 0.9], [2, 0.2]], [[7, 4.0], [1, 3.0]]]


@pytest.mark.parametrize("ours, expected", [
    ([5, 6, 7], (3, 0.0)),              # never parts
    ([5, 8, 1], (1, 0.1)),              # parts at step 1 on its runner-up
    ([5, 2, 7], (1, 0.8)),              # parts on the third candidate; later steps not compared
    ([9, 6, 7], (0, 0.5)),
    ([5, 6, 3], (2, math.inf)),         # a token the reference did not rank near the top
    ([5, 6], (2, math.inf)),            # stopped early
], ids=["same", "runner-up", "third", "first-step", "unranked", "short"])
def test_greedy_divergence_finds_the_step_and_its_margin(ours, expected):
    step, margin = greedy_divergence(ours, REF, TOP)
    assert step == expected[0]
    assert margin == pytest.approx(expected[1])
