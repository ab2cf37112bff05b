"""The measurements: perplexity over sliding windows, passkey retrieval, per-layer attention error.

Every measurement feeds tokens through the model in the row's chunk schedule (`Row.chunk_sizes`), so
each token attends the exact sinks, its own chunk and recent buffer exactly, and everything older
through the row's compressed format (with window 0: everything, its own key included, compressed).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tq_ops.eval.rows import Row, model_head_dim


def _progress(msg: str, t0: float) -> None:
    print(f"  [{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


# -- perplexity --------------------------------------------------------------------------------

def text_windows(ids: Tensor, length: int, count: int) -> list[Tensor]:
    """`count` consecutive, non-overlapping windows of `length` tokens from the 1-D `ids`."""
    if ids.numel() < length * count:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {count} windows of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


@dataclass
class PerplexityResult:
    nll_sum: float = 0.0
    tokens: int = 0
    held_bytes: int = 0       # KV bytes held at the end of the last window (raw tokens at 2 bytes)
    held_tokens: int = 0
    held_channels: int = 0    # held_tokens x layers x KV heads x 2 (K, V) x head_dim

    @property
    def held_bits_per_channel(self) -> float:
        """Bits per channel actually held after the last window, exact sinks and buffer included."""
        return self.held_bytes * 8 / self.held_channels if self.held_channels else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.tokens, 1))


@torch.inference_mode()
def perplexity(model, windows: list[Tensor], row: Row, chunk: int, t0: float) -> PerplexityResult:
    """Sum of next-token NLL over every position of every window (each window a fresh cache)."""
    res = PerplexityResult()
    dev = model.device
    for w, ids in enumerate(windows):
        ids = ids.to(dev)[None]
        cache = row.make_cache(model.config)
        pos = 0
        for size in row.chunk_sizes(ids.shape[1], chunk):
            piece = ids[:, pos:pos + size]
            logits = model(piece, past_key_values=cache, use_cache=True).logits[0].float()
            targets = ids[0, pos + 1:pos + size + 1]
            logits = logits[:targets.shape[0]]
            res.nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            res.tokens += targets.shape[0]
            pos += size
        if hasattr(cache, "memory_bytes"):
            res.held_bytes = cache.memory_bytes()
        else:
            res.held_bytes = sum(l.keys.numel() * 2 * 2 for l in cache.layers)
        res.held_tokens = ids.shape[1]
        cfg = model.config
        res.held_channels = (ids.shape[1] * cfg.num_hidden_layers * cfg.num_key_value_heads * 2
                             * model_head_dim(cfg))
        _progress(f"{row.label}: perplexity window {w + 1}/{len(windows)} "
                  f"({ids.shape[1]} tokens): running ppl {res.ppl:.3f}", t0)
    return res


# -- passkey -----------------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    length: int
    depth: float
    trial: int
    key: str
    ids: Tensor
    needle_pos: int          # token index where the needle sentence starts

    @property
    def needle_distance(self) -> int:
        """Tokens between the needle and the end of the prompt."""
        return self.ids.numel() - self.needle_pos


def passkey_prompts(tokenizer, lengths, depths, trials: int, seed: int = 0) -> list[PasskeyPrompt]:
    """Prompts of exactly `length` tokens (built from token ids, so every trial of a length has the
    same size), the needle after a `depth` fraction of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    intro, filler, question = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER), enc(PASSKEY_QUESTION)
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
                room = length - len(intro) - len(needle) - len(question)
                reps = room // len(filler)
                if reps < 1:
                    raise ValueError(f"passkey length {length} is too short for the prompt")
                before = round(reps * depth)
                pad = room - reps * len(filler)  # top up to exactly `length` with filler tokens
                ids = (intro + filler * before + needle + filler * (reps - before)
                       + filler[:pad] + question)
                out.append(PasskeyPrompt(length, depth, trial, key, torch.tensor(ids),
                                         len(intro) + before * len(filler)))
    return out


@torch.inference_mode()
def passkey(model, tokenizer, prompt: PasskeyPrompt, row: Row, chunk: int,
            new_tokens: int = 8) -> dict:
    """Greedy answer to one prompt: prefill in the row's chunk schedule, then decode token by token
    (a forward loop on the same cache).  Success: the key's digits appear in the answer."""
    dev = model.device
    ids = prompt.ids.to(dev)[None]
    cache = row.make_cache(model.config)
    pos = 0
    logits = None
    for size in row.chunk_sizes(ids.shape[1], chunk):
        logits = model(ids[:, pos:pos + size], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
        pos += size
    answer = []
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        answer.append(int(nxt))
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    text = tokenizer.decode(answer)
    digits = "".join(ch for ch in text if ch.isdigit())
    return dict(length=prompt.length, depth=prompt.depth, trial=prompt.trial, key=prompt.key,
                needle_distance=prompt.needle_distance, answer=text,
                ok=digits.startswith(prompt.key))


# -- attention-output error --------------------------------------------------------------------

def capture_attention_forward(module, query, key, value, attention_mask, scaling=None,
                              dropout=0.0, tq_capture=None, **kwargs):
    """SDPA that also records each layer's post-RoPE (query, key, value) into `tq_capture`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if tq_capture is not None:
        tq_capture[module.layer_idx] = (query.detach().float(), key.detach().float(),
                                        value.detach().float(), float(scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


CAPTURE_IMPLEMENTATION = "tq_eval_capture"


@torch.inference_mode()
def capture_qkv(model, ids: Tensor) -> dict[int, tuple]:
    """Run the exact model once over `ids` (1-D) and return {layer: (q, k, v, scale)}, q (1, Hq, T,
    D), k/v (1, Hkv, T, D) fp32."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    previous = model.config._attn_implementation
    store: dict[int, tuple] = {}
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        model(ids.to(model.device)[None], use_cache=False, tq_capture=store)
    finally:
        model.set_attn_implementation(previous)
    return store


@torch.inference_mode()
def attention_error(captured: dict[int, tuple], row: Row, model_config, chunk: int) -> list[float]:
    """Per layer: ||out - ref|| / ||ref|| over all query positions, where out is the attention
    output of the row's cache fed the captured K/V in the row's chunk schedule and ref is exact
    causal attention on the same inputs.  Isolates each layer (no error carried between layers)."""
    cache = row.make_cache(model_config)
    errs = []
    for layer_idx in sorted(captured):
        q, k, v, scale = captured[layer_idx]
        g = q.shape[1] // k.shape[1]
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                             is_causal=True, scale=scale)  # (1, Hq, T, D)
        if row.is_baseline:
            errs.append(0.0)
            continue
        layer = cache._make_layer(layer_idx)
        outs, pos = [], 0
        for size in row.chunk_sizes(q.shape[2], chunk):
            layer.update(k[:, :, pos:pos + size], v[:, :, pos:pos + size])
            outs.append(layer.attend(q[:, :, pos:pos + size].transpose(1, 2), scale))
            pos += size
        out = torch.cat(outs, dim=1).transpose(1, 2)
        errs.append(float((out - ref).norm() / ref.norm()))
    return errs


@dataclass
class RowResult:
    row: Row
    bits: float
    ppl: PerplexityResult | None = None
    passkey: list[dict] = field(default_factory=list)
    attn_err: list[float] = field(default_factory=list)
    seconds: float = 0.0
    high_layers: list[int] | None = None  # a layer mix's layers in its HIGH format
