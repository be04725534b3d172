"""Decoder-only model shapes for the memory plan (runtime/memory_plan.py): a model's sizes from
its config.json (a local folder, the local HF cache) or the shipped table of the reference models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes, as its config.json gives them."""
    name: str
    vocab_rows: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 / Qwen2.5 / R1-Distill-Qwen
    qk_norm: bool = True  # Qwen3

    @property
    def params(self) -> int:
        """Exact parameter count of a Qwen2/Qwen3-style model (embeddings, attention, SwiGLU MLP,
        RMSNorms, the LM head unless tied)."""
        H, I, Q, KV = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = H * Q + 2 * H * KV + Q * H + ((Q + 2 * KV) if self.qkv_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * H * I + 2 * H
        return self.vocab_rows * H * (1 if self.tied else 2) + self.layers * layer + H

    def kv_cache_bytes_per_token(self, b: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * b

    def layer_activation_bytes_per_token(self, dtype: str) -> float:
        H, I = self.hidden, self.intermediate
        Q, KV, n = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.heads + self.kv_heads
        if dtype == "float32":
            return 24 * H + 16 * I + 16 * Q + 16 * KV + 8 * n
        return 16 * H + 8 * I + 10 * Q + 10 * KV + 8 * n

    def outside_layers_bytes_per_token(self, dtype: str) -> float:
        """The final norm's saved states and the input ids (measured as the layers)."""
        return (9 if dtype == "float32" else 6.5) * self.hidden + 12


def _qwen3(name, rows, H, I, L, heads, kv, tied) -> Shape:
    return Shape(name, rows, H, I, L, heads, kv, 128, tied)


def _qwen2(name, rows, H, I, L, heads, kv, tied) -> Shape:
    return Shape(name, rows, H, I, L, heads, kv, H // heads, tied, qkv_bias=True, qk_norm=False)


# the reference models' config.json values, for planning without the hub
REFERENCE_SHAPES = {s.name: s for s in [
    _qwen3("Qwen/Qwen3-1.7B-Base", 151936, 2048, 6144, 28, 16, 8, True),
    _qwen3("Qwen/Qwen3-1.7B", 151936, 2048, 6144, 28, 16, 8, True),
    _qwen3("Qwen/Qwen3-4B", 151936, 2560, 9728, 36, 32, 8, True),
    _qwen3("Qwen/Qwen3-4B-Base", 151936, 2560, 9728, 36, 32, 8, True),
    _qwen3("Qwen/Qwen3-8B", 151936, 4096, 12288, 36, 32, 8, False),
    _qwen3("Qwen/Qwen3-8B-Base", 151936, 4096, 12288, 36, 32, 8, False),
    _qwen3("Qwen/Qwen3-32B", 151936, 5120, 25600, 64, 64, 8, False),
    _qwen2("Qwen/Qwen2.5-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, False),
    _qwen2("open-thoughts/OpenThinker3-7B", 152064, 3584, 18944, 28, 28, 4, False),
    _qwen2("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 151936, 1536, 8960, 28, 12, 2, False),
    _qwen2("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 152064, 3584, 18944, 28, 28, 4, False),
]}


def shape_from_config(name: str, c: dict) -> Shape:
    """A Shape from a config.json's keys (a composite config's text part)."""
    c = c.get("text_config", c)
    heads = c["num_attention_heads"]
    mtype = c.get("model_type", "")
    return Shape(name, c["vocab_size"], c["hidden_size"], c["intermediate_size"],
                 c["num_hidden_layers"], heads, c.get("num_key_value_heads", heads),
                 c.get("head_dim") or c["hidden_size"] // heads, bool(c.get("tie_word_embeddings", False)),
                 qkv_bias=bool(c.get("attention_bias", mtype.startswith("qwen2"))),
                 qk_norm=mtype.startswith("qwen3"))


def find_shape(path: str, revision: str | None = None) -> Shape:
    """The model's shape from its config.json — a local folder (toy:<name> included), the local
    HF cache (never downloaded) — else the shipped reference table; a ValueError otherwise."""
    from opd_exp.engines.hf_models import resolve_path

    local = Path(resolve_path(path))
    if (local / "config.json").is_file():
        return shape_from_config(path, json.loads((local / "config.json").read_text()))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json", revision=revision)
        if isinstance(cached, str):
            return shape_from_config(path, json.loads(Path(cached).read_text()))
    except ValueError:  # not a hub id
        pass
    if path in REFERENCE_SHAPES:
        return REFERENCE_SHAPES[path]
    raise ValueError(f"{path!r}: no config.json in a local folder or the HF cache, and not one of "
                     f"the shipped reference shapes ({', '.join(sorted(REFERENCE_SHAPES))})")
