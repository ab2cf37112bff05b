"""Calibrated per-layer bit allocation for layer-mix rows (``HIGH+LOW@BUDGET``, `tq_ops.eval.rows`).

A layer's sensitivity is how much the HIGH format lowers its attention-output error against LOW:
``attention_error(LOW)[i] - attention_error(HIGH)[i]`` (`metrics.attention_error`: every layer fed
the exact model's q/k/v, in the row's chunk schedule, sinks and recent window included).  The layers
are upgraded in decreasing order of that gain until the budget is spent (`LayerPlan.greedy`).

The measurement runs on a calibration text that must differ from the evaluation text: choosing the
layers on the text whose perplexity is then reported would tune on the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

from tq_ops.eval import metrics
from tq_ops.eval.rows import Row


@dataclass(frozen=True)
class Calibration:
    """The per-layer measurement behind a calibrated mix.

    Attributes:
        low_err, high_err: per-layer attention-output error of the uniform LOW / HIGH rows.
        order: layers by decreasing gain (low_err - high_err); ties by layer index.
    """
    low: str
    high: str
    low_err: tuple[float, ...]
    high_err: tuple[float, ...]

    @property
    def gain(self) -> tuple[float, ...]:
        return tuple(a - b for a, b in zip(self.low_err, self.high_err))

    @property
    def order(self) -> tuple[int, ...]:
        g = self.gain
        return tuple(sorted(range(len(g)), key=lambda i: (-g[i], i)))

    def as_dict(self) -> dict:
        return dict(low=self.low, high=self.high, low_err=list(self.low_err),
                    high_err=list(self.high_err), gain=list(self.gain), order=list(self.order))


def order_from_errors(low_err, high_err) -> tuple[int, ...]:
    """Layers by decreasing attention-error gain of HIGH over LOW (ties: lower index first)."""
    return Calibration("", "", tuple(low_err), tuple(high_err)).order


def calibrate(rows: list[Row], captured: dict[int, tuple], model_config,
              chunk: int) -> tuple[list[Row], dict[str, Calibration]]:
    """Give every calibrated mix row its upgrade order, measured on `captured` (the calibration
    text's q/k/v, `metrics.capture_qkv`).  One measurement per (HIGH, LOW, sinks, window, boundary)
    is shared by the rows that differ only in budget.  Returns the rows (others unchanged) and the
    measurements by row label."""
    cache: dict[tuple, Calibration] = {}
    out_rows, by_label = [], {}
    for row in rows:
        mix = None if row.is_baseline else row.mix
        if mix is None or mix.rule != "calib":
            out_rows.append(row)
            continue
        key = (mix.high, mix.low, row.sinks, row.window, row.boundary)
        if key not in cache:
            low = metrics.attention_error(captured, row.part(mix.low), model_config, chunk)
            high = metrics.attention_error(captured, row.part(mix.high), model_config, chunk)
            cache[key] = Calibration(mix.low, mix.high, tuple(low), tuple(high))
        cal = cache[key]
        by_label[row.label] = cal
        out_rows.append(row.with_order(cal.order))
    return out_rows, by_label
