"""The cold-start rejection rules (SPEC §2) on crafted texts: each accepts what it should and
rejects what it should, at its exact threshold."""

import random

import pytest

from opd_exp.recipes.rejection import rejection_reason

OK = "<think>3+4=7. 7+1=8.</think> \\boxed{8}"


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(n))


def test_a_plain_trace_is_kept_and_one_without_a_box_is_not():
    assert rejection_reason(OK) is None
    assert rejection_reason("<think>3+4=7.</think> the answer is 7") == "no_boxed"
    assert rejection_reason("\\boxed{7") == "no_boxed"  # unbalanced: no answer


@pytest.mark.parametrize("times,kept", [(4, True), (5, False)])
def test_a_line_of_20_chars_seen_5_times(times, kept):
    line = "we add the two numbers"  # 22 characters
    text = "\n".join(f"{line}\n{_words(3, i)}" for i in range(times)) + "\n" + OK
    assert rejection_reason(text) == (None if kept else "repeated_line")
    short = "\n".join(["7+1=8 so far"] * 9) + "\n" + OK  # < 20 characters: never counted
    assert rejection_reason(short) is None


@pytest.mark.parametrize("times,kept", [(2, True), (3, False)])
def test_a_100_char_string_seen_3_times(times, kept):
    gram = _words(15, 99)[:100]
    text = " | ".join(f"{gram} {_words(8, i)}" for i in range(times)) + " " + OK
    assert rejection_reason(text) == (None if kept else "repeated_ngram")


@pytest.mark.parametrize("times,kept", [(2, True), (3, False)])
def test_a_50_char_block_repeated_3_times_in_a_row(times, kept):
    block = _words(8, 7)[:50]
    text = _words(5, 1) + block * times + _words(5, 2) + " " + OK
    assert rejection_reason(text) == (None if kept else "repeated_block")
