"""Narrow, typed, lazily initialised wrappers around the tokenizers: jieba
segments Chinese, simplemma lemmatizes English words (:func:`lemma`).

simplemma (zero dependencies, MIT) looks words up in a dictionary shipped
inside the wheel, so nothing is downloaded at run time; irregular forms come
back as their lemma (``paid`` -> ``pay``, ``bought`` -> ``buy``, ``shipping``
-> ``ship``). Its English dictionary is read on first use (~0.2 s) or on
:func:`warm_up`; lookups then take about a microsecond.

jieba:

jieba ships no type information and has import-time and first-use side
effects this module contains:

* it logs "Building prefix dict ..." to stderr at DEBUG level: we raise the
  ``jieba`` logger to WARNING before anything is logged;
* some jieba/setuptools combinations emit ``DeprecationWarning`` /
  ``SyntaxWarning`` while importing or loading the dictionary (``pkg_resources``,
  invalid escapes in old sources): import and initialisation run under
  ``warnings.catch_warnings()`` so a test run with ``filterwarnings=error``
  stays green;
* loading the dictionary takes ~0.1 s from jieba's marshal cache and ~1 s
  without it (jieba then writes the cache file ``jieba.cache`` into the
  system temp directory -- jieba's own behaviour, the only write this package
  causes). It happens once per process, on first use or on :func:`warm_up`.

We use a private ``jieba.Tokenizer`` instance (not the module-level default)
so our domain words never leak into other users of jieba in the process.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import simplemma

__all__ = [
    "DOMAIN_WORDS",
    "LEMMA_MIN_LEN",
    "cut",
    "cut_many",
    "is_english_word",
    "is_ready",
    "lemma",
    "warm_up",
]

DOMAIN_WORDS: tuple[str, ...] = (
    "转人工",
    "人工客服",
    "七天无理由",
    "运费险",
    "到哪了",
    "退运费",
    "仅退款",
    "退货退款",
    "拍错",
    "少发",
    "漏发",
    "错发",
    "催发货",
    "改地址",
    "修改地址",
    "尺码表",
)
"""Words jieba's stock dictionary splits but that matter to this domain."""


class _Tokenizer(Protocol):
    def cut(self, sentence: str, cut_all: bool = ..., HMM: bool = ...) -> Iterator[str]: ...

    def add_word(self, word: str, freq: int | None = ..., tag: str | None = ...) -> None: ...

    def initialize(self, dictionary: str | None = ...) -> None: ...


_lock = threading.Lock()
_tokenizer: _Tokenizer | None = None


def _create() -> _Tokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jieba  # type: ignore[import-untyped, unused-ignore]

        jieba.setLogLevel(logging.WARNING)
        factory: Callable[[], _Tokenizer] = jieba.Tokenizer
        tokenizer = factory()
        tokenizer.initialize()
        for word in DOMAIN_WORDS:
            tokenizer.add_word(word)
    return tokenizer


def _get() -> _Tokenizer:
    global _tokenizer
    tokenizer = _tokenizer
    if tokenizer is None:
        with _lock:
            if _tokenizer is None:
                _tokenizer = _create()
            tokenizer = _tokenizer
    return tokenizer


def warm_up() -> None:
    """Load the dictionaries now (call at worker start to keep them off the first message)."""
    _get()
    lemma("warming")


LEMMA_MIN_LEN = 3
"""Shorter words are kept as written: simplemma reads ``us`` as ``we`` and ``m``
(of ``i'm``) as ``be``, while size letters (``s``/``m``/``l``) must stay."""


def is_english_word(word: str) -> bool:
    """Whether simplemma's English dictionary knows ``word`` (a lower-case word
    or lemma): a known word is not taken for a typo of another one."""
    return bool(word.isascii() and simplemma.is_known(word, lang="en"))


def lemma(word: str) -> str:
    """The English lemma of a lower-case word (``shipping`` -> ``ship``); words
    simplemma does not know, and short ones, come back unchanged."""
    if len(word) < LEMMA_MIN_LEN or not word.isascii() or not word.isalpha():
        return word
    return simplemma.lemmatize(word, lang="en").lower()


def is_ready() -> bool:
    """Whether the dictionary has been loaded in this process."""
    return _tokenizer is not None


def cut(text: str) -> list[str]:
    """Segment ``text`` (precise mode, HMM on). Non-Chinese runs come back as-is,
    including whitespace and punctuation tokens: callers filter."""
    return list(_get().cut(text, HMM=True))


def cut_many(texts: Iterable[str]) -> list[list[str]]:
    tokenizer = _get()
    return [list(tokenizer.cut(text, HMM=True)) for text in texts]
