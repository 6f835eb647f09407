"""Top-1 accuracy of the default knowledge base on labelled customer questions.

``faq_eval/{zh,en}.tsv`` hold questions as buyers write them, each labelled
with the entry (or keyword rule) of ``workers/bot/examples/kb.yaml`` that
answers it. They were written from the customer's side, not from the
knowledge base's variants (see the files' headers): they measure the matcher
and the knowledge base together on text neither was tuned on item by item.

Measured with :meth:`KnowledgeBase.resolve`, the bot's own first step after
the lexicon. The accuracy per language is printed at the end of the run
(terminal summary) and asserted against :data:`MIN_TOP1_ACCURACY`; the share
also answered with the engine's confidence (``>= DEFAULT_HANDOFF_THRESHOLD``,
otherwise the bot hands off instead of answering) is printed beside it.

The matcher and the knowledge base were improved while watching ``zh.tsv`` and
``en.tsv`` (general changes: an English lemmatizer, weights, synonyms, missing
entries -- not variants copied from the sets). ``*_holdout.tsv`` were written
afterwards and never tuned on: their accuracy, printed too, is the honest
estimate for new questions; it is only held above :data:`MIN_HOLDOUT_ACCURACY`
so that a regression shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.bot.engine import DEFAULT_HANDOFF_THRESHOLD
from workers.bot.knowledge import KnowledgeBase
from workers.bot.matching import detect_language
from workers.bot.plugin import EXAMPLE_KB

EVAL_DIR = Path(__file__).parent / "faq_eval"
MIN_TOP1_ACCURACY = 0.90
MIN_QUESTIONS = 100
MIN_HOLDOUT_ACCURACY = 0.65
MIN_HOLDOUT_QUESTIONS = 30
HOLDOUT = ("zh_holdout", "en_holdout", "zh_holdout2", "en_holdout2")
"""``*_holdout`` was written after the tuning on zh/en; ``*_holdout2`` after
``*_holdout`` had been read (its questions came out shorter and more usual)."""


@dataclass(frozen=True, slots=True)
class Labelled:
    line: int
    question: str
    expected: frozenset[str]


@dataclass(frozen=True, slots=True)
class Accuracy:
    name: str
    total: int
    top1: int
    confident: int
    misses: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.name}: top-1 {self.top1}/{self.total} = {self.top1 / self.total:.1%}, "
            f"answered (confidence >= {DEFAULT_HANDOFF_THRESHOLD}) "
            f"{self.confident}/{self.total} = {self.confident / self.total:.1%}"
        )


RESULTS: dict[str, Accuracy] = {}
"""Filled by the tests, printed by ``pytest_terminal_summary`` (tests/workers/bot/conftest.py)."""


def load_set(name: str) -> list[Labelled]:
    out = []
    path = EVAL_DIR / f"{name}.tsv"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        expected, question = line.split("\t")
        out.append(Labelled(number, question, frozenset(expected.split("|"))))
    return out


def measure(kb: KnowledgeBase, name: str) -> Accuracy:
    top1 = confident = 0
    misses = []
    for item in load_set(name):
        found = kb.resolve(item.question)
        if found is not None and found.id in item.expected:
            top1 += 1
            confident += found.confidence >= DEFAULT_HANDOFF_THRESHOLD
        else:
            got = f"{found.id} ({found.confidence:.2f})" if found else "nothing"
            misses.append(
                f"{name}.tsv:{item.line} {item.question!r}: "
                f"expected {'|'.join(sorted(item.expected))}, got {got}"
            )
    total = top1 + len(misses)
    return Accuracy(name, total, top1, confident, tuple(misses))


@pytest.fixture(scope="module")
def default_kb() -> KnowledgeBase:
    return KnowledgeBase.load(EXAMPLE_KB)


@pytest.mark.parametrize("name", ["zh", "en", *HOLDOUT])
def test_labelled_set_is_sound(default_kb: KnowledgeBase, name: str) -> None:
    items = load_set(name)
    assert len(items) >= (MIN_HOLDOUT_QUESTIONS if "holdout" in name else MIN_QUESTIONS)
    known = {e.id for e in default_kb.entries} | {r.id for r in default_kb.rules}
    for item in items:
        assert item.expected <= known, f"line {item.line}: unknown id {item.expected - known}"
        assert detect_language(item.question) == name[:2], f"line {item.line}"
    questions = [i.question.lower() for i in items]
    assert len(set(questions)) == len(questions), "a question is listed twice"
    # Not the knowledge base's own variants (that would measure nothing).
    variants = {q.lower() for e in default_kb.entries for q in e.questions}
    copied = [q for q in questions if q in variants]
    assert len(copied) <= len(questions) // 10, copied


def _measured(kb: KnowledgeBase, name: str, request: pytest.FixtureRequest) -> Accuracy:
    result = measure(kb, name)
    RESULTS[name] = result
    request.node.add_report_section(
        "call", "faq accuracy", "\n".join([result.summary(), *result.misses])
    )
    return result


@pytest.mark.parametrize("name", ["zh", "en"])
def test_top1_accuracy_on_labelled_questions(
    default_kb: KnowledgeBase, name: str, request: pytest.FixtureRequest
) -> None:
    result = _measured(default_kb, name, request)
    assert result.top1 / result.total >= MIN_TOP1_ACCURACY, "\n".join(
        [result.summary(), *result.misses]
    )


@pytest.mark.parametrize("name", HOLDOUT)
def test_top1_accuracy_on_held_out_questions(
    default_kb: KnowledgeBase, name: str, request: pytest.FixtureRequest
) -> None:
    result = _measured(default_kb, name, request)
    assert result.top1 / result.total >= MIN_HOLDOUT_ACCURACY, "\n".join(
        [result.summary(), *result.misses]
    )


def test_how_long_does_shipping_take_is_not_the_refund_answer(default_kb: KnowledgeBase) -> None:
    """The report in issue 11."""
    found = default_kb.resolve("how long does shipping take?")
    assert found is not None and found.id == "delivery_time"
    assert found.confidence >= DEFAULT_HANDOFF_THRESHOLD
