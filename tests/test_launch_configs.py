"""The decode kernel's split count (tq_ops.triton.decode.num_splits): a function of shapes only
that fills whole waves of resident programs, never splits finer than min_tokens_per_split
positions, and stays within [1, max_splits]."""
import pytest

from tq_ops.triton.decode import DECODE_CONFIGS, DEFAULT_DECODE, num_splits

SMS = 132  # an H100's SM count; the rule is the same for any count
# (batch, context): the decode shapes, plus a batch larger than one wave of programs
SHAPES = [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 16384), (64, 8192),
          (256, 2048), (1, 64), (3, 100)]
CONFIGS = {"default": DEFAULT_DECODE} | {f"{a}-d{d}-k{k}": c
                                         for (a, d, k), c in DECODE_CONFIGS.items()}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("batch,ctx", SHAPES, ids=[f"b{b}-ctx{c}" for b, c in SHAPES])
@pytest.mark.parametrize("waves", [1, 2])
def test_split_count_fills_whole_waves(cfg, batch, ctx, waves):
    hkv = 8
    rows = batch * hkv
    ns = num_splits(batch, hkv, ctx, SMS, cfg, waves=waves)
    slots = waves * cfg.resident_programs_per_sm * SMS
    cap = max(1, ctx // cfg.min_tokens_per_split)
    assert 1 <= ns <= cfg.max_splits
    assert ns <= cap
    if rows <= slots:
        # no partial wave beyond the requested ones ...
        assert rows * ns <= slots
        # ... and no room for one more split per row, unless a cap stopped it
        assert rows * (ns + 1) > slots or ns in (cap, cfg.max_splits)
    else:
        assert ns == 1
