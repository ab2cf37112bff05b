"""tq-eval: quality of KV formats on a real model (perplexity, passkey, attention error).

`python -m tq_ops.eval --help`; the harness is in `tq_ops.eval.metrics`, the rows (formats and
cache settings) in `tq_ops.eval.rows`, the vLLM and KIVI baselines in `tq_ops.eval.baselines`.
"""
