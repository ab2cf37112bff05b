"""Table, JSON, CSV and plot of an evaluation run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tq_ops.eval.metrics import RowResult


def _passkey_summary(r: RowResult, base: RowResult | None) -> tuple[str, str]:
    if not r.passkey:
        return "-", "-"
    ok = sum(p["ok"] for p in r.passkey)
    frac = f"{ok}/{len(r.passkey)}"
    if base is None or not base.passkey or r is base:
        return frac, "-"
    same = [p["ok"] for p in r.passkey] == [p["ok"] for p in base.passkey]
    return frac, "yes" if same else "NO"


def summary(r: RowResult, base: RowResult | None) -> dict:
    ppl = r.ppl.ppl if r.ppl else float("nan")
    base_ppl = base.ppl.ppl if (base and base.ppl) else float("nan")
    frac, same = _passkey_summary(r, base)
    held = r.ppl.held_bits_per_channel if r.ppl else float("nan")
    return dict(
        row=r.row.label, family=r.row.family, format=r.row.format, sinks=r.row.sinks,
        window=r.row.window, boundary=r.row.boundary, bits_per_channel=round(r.bits, 4),
        ppl=ppl, ppl_change_pct=100 * (ppl / base_ppl - 1) if base_ppl == base_ppl else float("nan"),
        tokens=r.ppl.tokens if r.ppl else 0, passkey=frac, passkey_equals_baseline=same,
        attn_err_mean=(sum(r.attn_err) / len(r.attn_err)) if r.attn_err else float("nan"),
        attn_err_max=max(r.attn_err) if r.attn_err else float("nan"),
        held_bits_per_channel=held, seconds=round(r.seconds, 1))


def _fmt(x, spec: str) -> str:
    if isinstance(x, float) and math.isnan(x):
        width = spec.lstrip("+").split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


def table(results: list[RowResult], baseline_name: str) -> str:
    base = next((r for r in results if r.row.is_baseline), None)
    hdr = (f"{'row':34} {'bits/ch':>7} {'ppl':>9} {'dppl %':>8} {'passkey':>8} {'=base':>5} "
           f"{'attn err':>9} {'max':>7} {'sec':>6}")
    lines = [hdr, "-" * len(hdr)]
    for r in results:
        s = summary(r, base)
        name = baseline_name if r.row.is_baseline else s["row"]
        lines.append(f"{name:34} {s['bits_per_channel']:>7.3f} {_fmt(s['ppl'], '9.3f')} "
                     f"{_fmt(s['ppl_change_pct'], '+8.2f')} {s['passkey']:>8} "
                     f"{s['passkey_equals_baseline']:>5} {_fmt(s['attn_err_mean'], '9.4f')} "
                     f"{_fmt(s['attn_err_max'], '7.4f')} {s['seconds']:>6.0f}")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, results: list[RowResult]) -> None:
    base = next((r for r in results if r.row.is_baseline), None)
    rows = []
    for r in results:
        d = summary(r, base)
        d.update(passkey_trials=r.passkey, attn_err_per_layer=r.attn_err,
                 nll_sum=r.ppl.nll_sum if r.ppl else None, high_layers=r.high_layers)
        rows.append(d)
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + "\n")


def write_csv(path: Path, results: list[RowResult]) -> None:
    base = next((r for r in results if r.row.is_baseline), None)
    rows = [summary(r, base) for r in results]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, results: list[RowResult], title: str) -> None:
    """Perplexity change (%) against effective bits per channel, one marker per family and
    setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in results if r.row.is_baseline), None)
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"turboquant": "o", "vllm": "s", "kivi": "^"}
    for r in results:
        if r.row.is_baseline or r.ppl is None:
            continue
        s = summary(r, base)
        setting = f"s{r.row.sinks} w{r.row.window} b{r.row.boundary}"
        color = {"w0": "tab:red"}.get(f"w{r.row.window}", "tab:blue")
        if r.row.boundary:
            color = "tab:green" if r.row.window else "tab:orange"
        ax.scatter(s["bits_per_channel"], s["ppl_change_pct"], marker=markers[r.row.family],
                   color=color, label=f"{r.row.family}, {setting}")
        ax.annotate(r.row.format, (s["bits_per_channel"], s["ppl_change_pct"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("effective bits per channel (K and V averaged, every stored byte)")
    ax.set_ylabel("perplexity change vs baseline (%)")
    ax.set_yscale("symlog", linthresh=5)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
