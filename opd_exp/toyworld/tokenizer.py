"""A Qwen-style BPE tokenizer for the toy world, trained with `tokenizers`.

Byte-level BPE (like Qwen's: every byte has a token, so any text encodes), digits split one per token, Qwen chat special tokens, a ChatML chat
template and left padding. Wrapped as a `PreTrainedTokenizerFast` so it is saved and loaded with
`save_pretrained` / `AutoTokenizer.from_pretrained`, like a hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END, THINK, END_THINK = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK, END_THINK]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int,
                    special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """`special_tokens`: leave out THINK / END_THINK for a tokenizer that splits the tags into
    pieces (like the LSM authors' tokenizer) — a test fixture."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, padding_side="left",
        additional_special_tokens=[t for t in (IM_START, THINK, END_THINK) if t in special_tokens],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024)
