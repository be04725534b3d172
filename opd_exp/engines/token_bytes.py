"""The bytes each token id stands for (cross-tokenizer alignment, methods/xtok.py): read from the
tokenizer's own tables once per vocabulary, never by decoding a token alone (a token holding
half of a multi-byte character decodes to U+FFFD).

- byte-level BPE (GPT-2, Qwen, Llama 3, DeepSeek): each character of a piece is one byte through
  the ByteLevel alphabet (`bytes_to_unicode`);
- SentencePiece (Llama 2, Mistral, Gemma): `▁` is a space, `<0xNN>` the byte NN;
- added tokens (`<|im_end|>`, `<think>`): their content's UTF-8, as they appear in text.
"""

from __future__ import annotations

import json
import re

from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer) -> set[str]:
    """The types of the fast tokenizer's decoder (a Sequence's members included)."""
    d = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return {d.get("type")} | {m.get("type") for m in d.get("decoders", [])}


def token_bytes(tokenizer) -> list[bytes]:
    """`out[i]`: the bytes of token id i, for every id of the tokenizer (len(tokenizer))."""
    V = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(V)))
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types:
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        plain = lambda p: bytes(byte_of[c] for c in p)  # noqa: E731
    elif types & {"Metaspace", "ByteFallback", "Replace"}:
        def plain(p: str) -> bytes:
            m = _BYTE_PIECE.fullmatch(p)
            return bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode()
    else:
        raise ValueError(f"cross-tokenizer alignment: tokenizer {tokenizer.name_or_path!r} has a "
                         f"decoder of type {sorted(t for t in types if t)}; supported: byte-level "
                         "BPE and SentencePiece (Metaspace / byte fallback)")
    return [added[i].encode() if i in added else b"" if p is None else plain(p)
            for i, p in enumerate(pieces)]
