"""The toy world's synthetic math task (SPEC §6).

A problem is a chain of L additions/subtractions (L = level, 1..6) on whole numbers 0..99 whose
running value stays in 0..99, asked in one of several phrasings. The response is a chain of
thought inside ``<think>…</think>`` followed by the answer in ``\\boxed{}``:

    prompt:   Compute 37+45-18.
    response: <think>37+45=82. 82-18=64.</think> \\boxed{64}

Other models of the world write the same problem in their own style (`render`): `foreign`, a
teacher with another pattern of thought (`<think>start 37. add 45 gives 82. take 18 gives
64.</think> \\boxed{64}`), and `base`, a Base model's plain text
(`37 + 45 = 82, 82 - 18 = 64. The answer is \\boxed{64}.`, no think tags). Two keep the chat
style's equations and differ only around them: `readable` (`<think>Start at 37. First 37+45=82.
Then 82-18=64. Check 64+18=82. So 64.</think> \\boxed{64}`) and `base_near`
(`37+45=82. 82-18=64. The answer is \\boxed{64}.`).

Everything is a pure function of a ``random.Random`` so a seed rebuilds the same world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LEVELS = (1, 2, 3, 4, 5, 6)
MAX_VALUE = 99

NAMES = (
    "Ana", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kira", "Leo",
    "Mia", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara",
    "Zoe", "Omar", "Lena", "Ravi", "Nina", "Theo",
)
ITEMS = (
    "apples", "books", "coins", "stamps", "marbles", "cards", "pens", "shells", "stickers",
    "cookies", "eggs", "flowers", "keys", "rocks", "toys", "candies", "pencils", "beads",
    "buttons", "tickets", "plums", "nuts", "cups", "bottles", "ribbons", "boxes", "balls",
    "grapes", "lemons", "leaves",
)
GAIN_VERBS = ("finds", "buys", "gets", "receives", "picks up", "wins", "earns", "collects")
LOSS_VERBS = ("gives away", "loses", "sells", "eats", "drops", "uses", "donates", "breaks")
FAMILIES = ("expr", "words", "question")
# how a model of the world writes its response; `readable` and `base_near` keep the chat style's
# equations and differ around them (docs/toyworld.md)
STYLES = ("chat", "foreign", "base", "readable", "base_near")


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message (no chat template)
    thought: str  # the chain of thought, without the <think> tags
    answer: str  # the final answer as written inside \boxed{}
    level: int
    family: str
    start: int = 0  # the chain: start value and (op, operand) pairs
    ops: tuple[tuple[str, int], ...] = ()

    @property
    def response(self) -> str:
        """The reference response a perfect model writes (without the end-of-turn token)."""
        return f"<think>{self.thought}</think> \\boxed{{{self.answer}}}"

    def render(self, style: str) -> str:
        """The response in a model's own style (`STYLES`), without its end token."""
        if style == "chat":
            return self.response
        steps, value = [], self.start
        for op, n in self.ops:
            new = value + n if op == "+" else value - n
            steps.append((value, op, n, new))
            value = new
        if style == "foreign":  # another pattern: the start stated, then each move in words
            moves = " ".join(f"{'add' if op == '+' else 'take'} {n} gives {new}."
                             for _, op, n, new in steps)
            return f"<think>start {self.start}. {moves}</think> \\boxed{{{self.answer}}}"
        if style == "base":  # plain text: no think tags, spaced sums, its own closing phrase
            chain = ", ".join(f"{a} {op} {n} = {new}" for a, op, n, new in steps)
            return f"{chain}. The answer is \\boxed{{{self.answer}}}."
        if style == "readable":  # the chat equations, other connectives and a verification
            first, *rest = [f"{a}{op}{n}={new}." for a, op, n, new in steps]
            a, op, n, new = steps[-1]
            check = f"{new}{'-' if op == '+' else '+'}{n}={a}."
            return (f"<think>Start at {self.start}. First {first} "
                    + "".join(f"Then {e} " for e in rest)
                    + f"Check {check} So {self.answer}.</think> \\boxed{{{self.answer}}}")
        if style == "base_near":  # the chat thought as plain text: other start and end only
            return f"{self.thought} The answer is \\boxed{{{self.answer}}}."
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _chain(rng: random.Random, level: int) -> tuple[int, list[tuple[str, int]]]:
    """Start value and `level` (op, operand) pairs with every running value in 0..MAX_VALUE."""
    value = rng.randint(0, MAX_VALUE)
    start, ops = value, []
    for _ in range(level):
        op = rng.choice("+-")
        if op == "+" and value == MAX_VALUE:
            op = "-"
        if op == "-" and value == 0:
            op = "+"
        operand = rng.randint(1, MAX_VALUE - value) if op == "+" else rng.randint(1, value)
        value = value + operand if op == "+" else value - operand
        ops.append((op, operand))
    return start, ops


def _thought(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    steps, value = [], start
    for op, operand in ops:
        new = value + operand if op == "+" else value - operand
        steps.append(f"{value}{op}{operand}={new}.")
        value = new
    return " ".join(steps), value


def _phrase(rng: random.Random, family: str, start: int, ops: list[tuple[str, int]]) -> str:
    if family == "expr":
        return "Compute " + str(start) + "".join(f"{op}{n}" for op, n in ops) + "."
    if family == "question":
        words = [f"{'plus' if op == '+' else 'minus'} {n}" for op, n in ops]
        return f"What is {start} " + " ".join(words) + "?"
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."]
    for op, n in ops:
        verb = rng.choice(GAIN_VERBS if op == "+" else LOSS_VERBS)
        sentences.append(f"Then {name} {verb} {n}.")
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences)


def make_problem(rng: random.Random, level: int, family: str | None = None) -> Problem:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    family = family or rng.choice(FAMILIES)
    start, ops = _chain(rng, level)
    thought, value = _thought(start, ops)
    return Problem(_phrase(rng, family, start, ops), thought, str(value), level, family, start,
                   tuple(ops))


def sample_problems(seed: int, levels: tuple[int, ...], count: int,
                    exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """`count` distinct problems, levels cycled in order, none of whose prompts is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < count:
        p = make_problem(rng, levels[len(out) % len(levels)])
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out
