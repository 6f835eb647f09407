"""Text normalisation, order-id extraction and fuzzy question matching.

How a message is compared with a question variant
-------------------------------------------------

Both sides go through the same pipeline:

1. :func:`normalize`: Unicode NFKC (full-width ``１２３`` / ``？`` become ASCII),
   curly quotes unified, lower case, English contractions expanded
   (``where's`` -> ``where``, ``didn't`` -> ``did not``), whitespace collapsed.
2. Synonym canonicalisation (:class:`Synonyms`): ``包裹``/``物流`` -> ``快递``,
   ``parcel(s)`` -> ``package`` ... at string level, longest phrase first;
   English terms only on word boundaries, Chinese terms as substrings (so only
   multi-character Chinese terms that are safe as substrings belong there).
3. Two views of the canonical text:

   * ``chars``: punctuation and emoji removed, spaces kept only between
     Latin/digit words;
   * ``tokens``: jieba segmentation (it passes Latin words through), English
     words lemmatized by simplemma (:func:`.segment.lemma`: ``shipping`` ->
     ``ship``, ``refunded`` -> ``refund``, ``paid`` -> ``pay``), minus
     punctuation, minus :data:`ZH_STOPWORDS` / :data:`EN_STOPWORDS`, as a set.

The score of a message against one variant is::

    score = TOKEN_WEIGHT * token_f1 + CHAR_WEIGHT * char_similarity

for a message with Chinese in it, and with :data:`EN_CHAR_WEIGHT` instead of
``CHAR_WEIGHT`` (and ``1 - EN_CHAR_WEIGHT`` for the tokens) for one without:
in English the lemmas carry the meaning, and the letters that "how long does
shipping take" shares with "how long does a refund take" say little.

``char_similarity`` is rapidfuzz's normalised Indel similarity
(``fuzz.ratio / 100``) of the two ``chars`` strings: robust to typos and to
segmentation differences, and the right granularity for Chinese where every
character carries meaning.

``token_f1`` is a soft, IDF-weighted token-set F1: a message token matches a
variant token exactly (1.0) or, for tokens of 3+ characters, fuzzily with
``fuzz.ratio >= TOKEN_FUZZY_MIN`` (``ordr`` ~ ``order``) -- but a word the
English dictionary knows is no typo (``black`` never matches ``back``) unless
one word starts with the other (``sales`` ~ ``sale``). Precision is the
weighted share of the message's tokens found in *any* variant of the candidate
(the variants together are the candidate's vocabulary: "any coupons" is
covered by "any discount" + "do you have coupons"), recall the weighted share
of this variant's tokens found in the message; weights are smoothed IDF over the candidates
(entries), so words every entry uses (``什么``, ``how``) count less than the
ones that discriminate (``快递``, ``refund``); words that frame a question
rather than name its topic (:data:`FRAME_WORDS`: ``how long``, ``day``,
``item``, ``什么时候``) are weighted down by :data:`FRAME_WEIGHT`; a message
token unknown to the whole knowledge base gets the highest weight (gibberish is
penalised). We do
not use ``fuzz.token_set_ratio`` directly because it returns 100 whenever one
token set is a subset of the other: a long shipping question that happens to
start with ``你好`` would score 1.0 against the one-token greeting variant.

Identical canonical ``chars`` short-circuit to 1.0. A candidate's score is its
best variant's score. The reported **confidence** is the best candidate's
score, lowered when the runner-up from a *different group* (intent) is within
:data:`AMBIGUITY_MARGIN`: ``score * (1 - AMBIGUITY_PENALTY * (1 - gap/margin))``
-- two intents scoring alike means the answer is a coin toss, which should
push the engine towards a human. Exact matches are exempt unless the runner-up
is exact too.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rapidfuzz import fuzz, process

from . import segment

__all__ = [
    "AMBIGUITY_MARGIN",
    "AMBIGUITY_PENALTY",
    "BUILTIN_SYNONYMS",
    "CHAR_WEIGHT",
    "EN_CHAR_WEIGHT",
    "EN_STOPWORDS",
    "FRAME_WEIGHT",
    "FRAME_WORDS",
    "MIN_ANCHORED_ORDER_ID_LEN",
    "MIN_BARE_ORDER_ID_DIGITS",
    "SUPPORTED_LANGUAGES",
    "TOKEN_FUZZY_MIN",
    "TOKEN_WEIGHT",
    "ZH_STOPWORDS",
    "Candidate",
    "Language",
    "Match",
    "Matcher",
    "OrderIdMatch",
    "Synonyms",
    "char_view",
    "contains_term",
    "detect_language",
    "extract_order_id",
    "find_order_id",
    "normalize",
    "tokens",
]

# --------------------------------------------------------------------------- constants

TOKEN_WEIGHT = 0.6
"""Weight of the soft token-set F1 in a variant's score."""
CHAR_WEIGHT = 0.4
"""Weight of the character-level similarity (``TOKEN_WEIGHT + CHAR_WEIGHT == 1``)."""
EN_CHAR_WEIGHT = 0.15
"""The character weight for a message without Chinese (the token weight is then
``1 - EN_CHAR_WEIGHT``): in English whole words, lemmatized, carry the meaning,
and letters shared by "how many days to deliver" and "how many days do I have
to return" say little; every Chinese character does."""
TOKEN_FUZZY_MIN = 0.8
"""Two different tokens count as the same word when their Indel similarity is at
least this (both must be :data:`TOKEN_FUZZY_MIN_LEN`+ characters): catches
typos like ``parcle``/``parcel`` without letting ``快递``/``快点`` match."""
TOKEN_FUZZY_MIN_LEN = 3
AMBIGUITY_MARGIN = 0.1
"""Runner-up (different intent) within this many points of the best lowers confidence."""
AMBIGUITY_PENALTY = 0.2
"""Maximum relative confidence reduction (gap 0) for an ambiguous best match."""

MIN_BARE_ORDER_ID_DIGITS = 6
"""A bare run of at least this many digits is taken for an order id (Taobao/Tmall
ids have 18-19 digits, JD ~12); shorter numbers are sizes, prices, heights."""
MIN_ANCHORED_ORDER_ID_LEN = 3
"""After ``订单``/``order``/``#`` an id needs this many characters (``order 123``
is an id, "the order 3 days ago" is not)."""

Language = Literal["zh", "en"]
SUPPORTED_LANGUAGES: tuple[Language, ...] = ("zh", "en")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


ZH_STOPWORDS: frozenset[str] = _words(
    "的 了 吗 呢 啊 呀 吧 哦 噢 嘛 么 啦 哈 嗯 喔 哇 亲 亲亲 请问 问 问下 问一下 一下 下 "
    "我 我的 我们 你 你们 您 请 麻烦 那个 这个 就 是 都 也 想 要 我要 我想 能 "
    "可以 能不能 可不可以 帮 帮我 一个"
)
"""Chinese function words and politeness particles ignored by the token view
(the character view still sees them)."""

EN_STOPWORDS: frozenset[str] = _words(
    "a an the is are am was were be been being i me my mine we our us you your it its "
    "this that these those to of for on in at by with do does did can could would will "
    "shall should please pls plz and or so just there here s t d m ll re ve want "
    "need until before after about from into than if then yet still already ever also too "
    "really very usually normally typically"
)
"""English function words ignored by the token view. Question words (where,
when, how, what) are kept: they separate "where is it" from "how do I"."""

FRAME_WORDS: frozenset[str] = _words(
    "how what when where which who why many much long soon fast often time "
    "minute hour day week month get take make go have has let tell know "
    "item product thing stuff goods 东西 商品 宝贝 货 "
    "怎么 怎样 如何 什么 啥 多久 多长 多少 几 几天 天 小时 时间 时候 什么时候 哪 哪个 为什么 怎么办 "
    "还 没 不 没有 还没 一般 大概 现在 已经 给 让 把 吧 弄 做 看 看看 查 下"
)
"""Words that frame a question ("how long", "什么时候", "can you get") rather than
name its topic: kept (they still tell "when" from "how much") but weighted by
:data:`FRAME_WEIGHT`, so the topic words decide which entry a message is about
("how many days until the refund shows up" is about refunds, not delivery).
English words are listed as lemmas."""
FRAME_WEIGHT = 0.4
"""Weight factor of :data:`FRAME_WORDS` (times their IDF)."""

BUILTIN_SYNONYMS: Mapping[str, tuple[str, ...]] = {
    "快递": ("包裹", "物流", "快件"),
    "哪": ("哪里", "哪儿"),
    "什么": ("啥",),
    "发货": ("发出", "寄出"),
    "尺码": ("码数",),
    "你好": ("您好", "哈喽"),
    "优惠券": ("优惠卷", "券"),
    "发票": ("开发票", "开票"),
    "有": ("有没有",),
    "运费": ("邮费", "快递费"),
    "优惠": ("折扣", "打折"),
    "单号": ("运单号", "快递单号", "物流单号"),
    "package": ("parcel", "shipment"),
    "shipping": ("delivery", "postage"),
    "cod": ("cash on delivery",),
    "courier": (
        "carrier",
        "shipping company",
        "delivery company",
        "delivery service",
        "dhl",
        "ups",
        "fedex",
        "usps",
        "ems",
        "royal mail",
    ),
    "hello": ("hi", "hey", "hiya"),
    "refund": ("money back",),
    "return": ("send back", "send it back"),
    "size": ("sizing",),
    "colour": ("color",),
}
"""Canonical term -> variants folded into it before scoring (per-KB synonyms add
to these). Chinese variants are replaced as substrings, so only safe ones:
``货`` -> ``快递`` would wreck ``退货``."""

# --------------------------------------------------------------------------- normalisation

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_LATIN_RE = re.compile(r"[a-z]", re.IGNORECASE)
_WS_RE = re.compile(r"\s+")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'(?:s|re|ve|ll|d|m)\b"), ""),
)
_NON_WORD_RE = re.compile(r"[^\w]+|_+")
_SPACE_NEAR_CJK_RE = re.compile(f"(?<=[{_CJK}]) +| +(?=[{_CJK}])")


def normalize(text: str) -> str:
    """NFKC, unified quotes, lower case, contractions expanded, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    return _WS_RE.sub(" ", text).strip()


def char_view(normalized: str) -> str:
    """Punctuation/emoji removed; spaces only between Latin/digit words."""
    text = _NON_WORD_RE.sub(" ", normalized).strip()
    return _SPACE_NEAR_CJK_RE.sub("", text)


def detect_language(text: str) -> Language | None:
    """``zh`` if the text has any CJK ideograph, ``en`` if it has Latin letters,
    else ``None`` (digits, emoji, punctuation only)."""
    if _CJK_RE.search(text):
        return "zh"
    if _LATIN_RE.search(text):
        return "en"
    return None


def _is_cjk_term(term: str) -> bool:
    return bool(_CJK_RE.search(term))


def term_pattern(term: str) -> str:
    """Regex source for ``term`` (already normalised): Chinese as a substring,
    anything else bounded by non-alphanumerics (a Chinese character counts as a
    boundary: ``打12315``), with flexible inner whitespace and an optional plural
    ``s``/``es`` after a letter."""
    if _is_cjk_term(term):
        return re.escape(term)
    inner = r"\s+".join(re.escape(part) for part in term.split())
    plural = "(?:e?s)?" if term[-1:].isalpha() else ""
    return rf"(?<![a-z0-9]){inner}{plural}(?![a-z0-9])"


def contains_term(normalized: str, term: str) -> bool:
    """Whether ``normalized`` contains the normalised ``term`` (see :func:`term_pattern`)."""
    return re.search(term_pattern(normalize(term)), normalized) is not None


class Synonyms:
    """Folds variants into canonical terms at string level (longest first)."""

    def __init__(self, groups: Mapping[str, Iterable[str]]) -> None:
        mapping: dict[str, str] = {}
        for canonical, variants in groups.items():
            canon = normalize(canonical)
            for variant in variants:
                var = normalize(variant)
                if var and var != canon:
                    mapping[var] = canon
        # Canonical terms map to themselves so that, longest first, a variant
        # inside a canonical term is left alone ("券" inside "优惠券").
        for canon in list(mapping.values()):
            mapping.setdefault(canon, canon)
        self._mapping = mapping
        if not mapping:
            self._pattern: re.Pattern[str] | None = None
            return
        parts: list[str] = []
        for var in sorted(mapping, key=len, reverse=True):
            if _is_cjk_term(var):
                parts.append(f"(?P<g{len(parts)}>{re.escape(var)})")
            else:
                inner = r"\s+".join(re.escape(p) for p in var.split())
                parts.append(f"(?<![a-z0-9])(?P<g{len(parts)}>{inner})(?:e?s)?(?![a-z0-9])")
        self._targets = [mapping[v] for v in sorted(mapping, key=len, reverse=True)]
        self._pattern = re.compile("|".join(parts))

    @classmethod
    def merged(cls, extra: Mapping[str, Iterable[str]] | None = None) -> Synonyms:
        groups: dict[str, list[str]] = {k: list(v) for k, v in BUILTIN_SYNONYMS.items()}
        for canonical, variants in (extra or {}).items():
            groups.setdefault(canonical, []).extend(variants)
        return cls(groups)

    def apply(self, normalized: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return normalized
        targets = self._targets

        def repl(m: re.Match[str]) -> str:
            assert m.lastgroup is not None
            return targets[int(m.lastgroup[1:])]

        return pattern.sub(repl, normalized)


def _frame_factor(token: str) -> float:
    return FRAME_WEIGHT if token in FRAME_WORDS else 1.0


def tokens(canonical: str) -> list[str]:
    """Content tokens of canonical text, in order, deduplicated."""
    seen: dict[str, None] = {}
    for raw in segment.cut(canonical):
        tok = raw.strip()
        if not tok or _NON_WORD_RE.fullmatch(tok):
            continue
        tok = segment.lemma(tok)
        if tok in ZH_STOPWORDS or tok in EN_STOPWORDS:
            continue
        seen.setdefault(tok, None)
    return list(seen)


# --------------------------------------------------------------------------- order ids


@dataclass(frozen=True, slots=True)
class OrderIdMatch:
    value: str
    """The id as written (NFKC-normalised, case kept)."""
    remainder: str
    """The NFKC text with the id itself cut out (the anchor word stays)."""
    kind: Literal["anchored", "hash", "bare"]


_ID_CHARS = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ANCHORED_RE = re.compile(
    r"(?:订单编号|订单号码|订单号|订单|(?<![A-Za-z])order(?:\s*(?:number|no\.?|num|id))?)"
    r"\s*(?:是|为|:|is\b)?\s*#?\s*"
    rf"(?P<id>{_ID_CHARS})",
    re.IGNORECASE,
)
_HASH_RE = re.compile(rf"#\s*(?P<id>{_ID_CHARS})")
_ANCHORS: tuple[tuple[Literal["anchored", "hash"], re.Pattern[str]], ...] = (
    ("anchored", _ANCHORED_RE),
    ("hash", _HASH_RE),
)
_TRACKING_RE = re.compile(
    r"(?:运单号?|快递单号|物流单号|单号|tracking(?:\s*(?:number|no\.?|num|#))?)"
    r"\s*(?:是|为|:|is\b)?\s*#?\s*[A-Za-z0-9-]+",
    re.IGNORECASE,
)
_BARE_RE = re.compile(
    rf"(?<![A-Za-z0-9])(?P<id>[0-9]{{{MIN_BARE_ORDER_ID_DIGITS},40}})(?![A-Za-z0-9])"
)
_CN_MOBILE_RE = re.compile(r"1[3-9][0-9]{9}")


def find_order_id(text: str) -> OrderIdMatch | None:
    """The order id a customer mentions, if any.

    In order of preference: an id after ``订单``/``订单号``/``order``/``order no.``
    (must contain a digit, :data:`MIN_ANCHORED_ORDER_ID_LEN`+ characters; letters
    and dashes allowed for own-mall ids); ``#123``; a bare run of
    :data:`MIN_BARE_ORDER_ID_DIGITS`+ digits that is not a Chinese mobile number
    and not a tracking number (``运单号``/``tracking no.``).
    """
    nfkc = unicodedata.normalize("NFKC", text)
    for kind, pattern in _ANCHORS:
        for m in pattern.finditer(nfkc):
            value = m.group("id")
            if len(value) >= MIN_ANCHORED_ORDER_ID_LEN and any(c.isdigit() for c in value):
                start, end = m.span("id")
                return OrderIdMatch(value, nfkc[:start] + " " + nfkc[end:], kind)
    masked = _TRACKING_RE.sub(lambda m: " " * len(m.group()), nfkc)
    for m in _BARE_RE.finditer(masked):
        value = m.group("id")
        if _CN_MOBILE_RE.fullmatch(value):
            continue
        start, end = m.span("id")
        return OrderIdMatch(value, nfkc[:start] + " " + nfkc[end:], "bare")
    return None


def extract_order_id(text: str) -> str | None:
    """Just the id of :func:`find_order_id` (``"where is my order 123?"`` -> ``"123"``)."""
    found = find_order_id(text)
    return found.value if found else None


# --------------------------------------------------------------------------- matcher


@dataclass(frozen=True, slots=True)
class Candidate:
    """Something that can be matched: ``key`` (entry id), ``group`` (intent) and
    the texts (question variants) that represent it."""

    key: str
    group: str
    texts: Sequence[str]


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    group: str
    confidence: float
    """In [0, 1]: ``score`` lowered for ambiguity (see the module docstring)."""
    score: float
    """In [0, 1]: the best variant's raw score."""
    variant: str
    """The question variant that matched best."""
    runner_up: tuple[str, float] | None = None
    """Best candidate of another group: (key, score)."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    chars: str
    tokens: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Variant:
    candidate: int
    text: str
    chars: str
    token_ids: frozenset[int]
    weight: float
    """Sum of the IDF of its tokens."""


class Matcher:
    """Ranks candidates against a message. Build once per knowledge base; the
    jieba dictionary is loaded on first use (not here) unless it already is."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        synonyms: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self._candidates = list(candidates)
        self._synonyms = Synonyms.merged(synonyms)
        self._built = False
        self._vocab: dict[str, int] = {}
        self._idf: list[float] = []
        self._long_vocab: list[str] = []
        self._long_ids: list[int] = []
        self._variants: list[_Variant] = []
        self._variant_chars: list[str] = []
        self._by_token: dict[int, list[int]] = {}
        self._exact: dict[str, list[int]] = {}
        self._candidate_tokens: list[frozenset[int]] = []
        self._unknown_idf = 1.0

    @property
    def synonyms(self) -> Synonyms:
        return self._synonyms

    def canonical(self, text: str) -> str:
        """Normalised, synonym-folded text."""
        return self._synonyms.apply(normalize(text))

    def key(self, text: str) -> str:
        """The exact-match key of ``text`` (canonical character view)."""
        return char_view(self.canonical(text))

    def _prepare(self, text: str) -> _Prepared:
        canonical = self.canonical(text)
        return _Prepared(char_view(canonical), tuple(tokens(canonical)))

    def _build(self) -> None:
        if self._built:
            return
        prepared: list[tuple[int, str, _Prepared]] = []
        doc_freq: dict[str, int] = {}
        for index, cand in enumerate(self._candidates):
            seen: set[str] = set()
            for text in cand.texts:
                prep = self._prepare(text)
                prepared.append((index, text, prep))
                seen.update(prep.tokens)
            for tok in seen:
                doc_freq[tok] = doc_freq.get(tok, 0) + 1
        n = len(self._candidates)
        for tok, df in doc_freq.items():
            self._vocab[tok] = len(self._idf)
            self._idf.append((math.log((n + 1) / (df + 1)) + 1.0) * _frame_factor(tok))
            if len(tok) >= TOKEN_FUZZY_MIN_LEN:
                self._long_vocab.append(tok)
                self._long_ids.append(self._vocab[tok])
        self._unknown_idf = math.log(n + 1) + 1.0
        for cand_index, text, prep in prepared:
            ids = frozenset(self._vocab[t] for t in prep.tokens)
            vindex = len(self._variants)
            self._variants.append(
                _Variant(cand_index, text, prep.chars, ids, sum(self._idf[i] for i in ids))
            )
            self._variant_chars.append(prep.chars)
            for tid in ids:
                self._by_token.setdefault(tid, []).append(vindex)
            if prep.chars:
                self._exact.setdefault(prep.chars, []).append(vindex)
        union: list[set[int]] = [set() for _ in self._candidates]
        for variant in self._variants:
            union[variant.candidate] |= variant.token_ids
        self._candidate_tokens = [frozenset(ids) for ids in union]
        self._built = True

    def _query_sims(self, toks: Sequence[str]) -> tuple[list[dict[int, float]], list[float]]:
        """Per query token: {vocab id: similarity} and the token's weight."""
        sims: list[dict[int, float]] = []
        weights: list[float] = []
        for tok in toks:
            row: dict[int, float] = {}
            exact = self._vocab.get(tok)
            if exact is not None:
                row[exact] = 1.0
            if len(tok) >= TOKEN_FUZZY_MIN_LEN and self._long_vocab:
                # A word the English dictionary knows is no typo: "black" is not
                # "back". It may still be a form the lemmatizer left alone
                # ("sales", "internationally"): one word starting with the other.
                known = segment.is_english_word(tok)
                for word, score, pos in process.extract(
                    tok,
                    self._long_vocab,
                    scorer=fuzz.ratio,
                    score_cutoff=TOKEN_FUZZY_MIN * 100,
                    limit=None,
                ):
                    if known and not (word.startswith(tok) or tok.startswith(word)):
                        continue
                    tid = self._long_ids[pos]
                    row[tid] = max(row.get(tid, 0.0), score / 100.0)
            if exact is not None:
                weight = self._idf[exact]
            elif row:
                weight = self._idf[max(row, key=lambda t: row[t])]
            else:
                weight = self._unknown_idf * _frame_factor(tok)
            sims.append(row)
            weights.append(weight)
        return sims, weights

    @staticmethod
    def _coverage(
        token_ids: frozenset[int], sims: list[dict[int, float]], weights: list[float]
    ) -> float:
        """Weighted share of the message's tokens found among ``token_ids``."""
        matched = 0.0
        for row, weight in zip(sims, weights, strict=True):
            matched += weight * max(
                (sim for tid, sim in row.items() if tid in token_ids), default=0.0
            )
        return matched / sum(weights)

    def _token_f1(self, variant: _Variant, precision: float, sims: list[dict[int, float]]) -> float:
        if not sims or not variant.token_ids:
            return 0.0
        best_v: dict[int, float] = {}
        for row in sims:
            for tid, sim in row.items():
                if tid in variant.token_ids and sim > best_v.get(tid, 0.0):
                    best_v[tid] = sim
        recall = sum(self._idf[t] * s for t, s in best_v.items()) / variant.weight
        if precision + recall == 0.0:
            return 0.0
        return 2 * precision * recall / (precision + recall)

    def _variant_scores(self, text: str) -> dict[int, float]:
        """Score of every variant worth scoring (others score < CHAR_WEIGHT * their
        character similarity, which rapidfuzz computed for all of them)."""
        self._build()
        query = self._prepare(text)
        scores: dict[int, float] = {}
        if not query.chars:
            return scores
        for vindex in self._exact.get(query.chars, ()):
            scores[vindex] = 1.0
        sims, weights = self._query_sims(query.tokens)
        touched: set[int] = set()
        for row in sims:
            for tid in row:
                touched.update(self._by_token.get(tid, ()))
        char_scores = {
            pos: score / 100.0
            for _, score, pos in process.extract(
                query.chars,
                self._variant_chars,
                scorer=fuzz.ratio,
                limit=None,
            )
        }
        precisions: dict[int, float] = {}
        char_weight = CHAR_WEIGHT if _CJK_RE.search(query.chars) else EN_CHAR_WEIGHT
        for vindex, variant in enumerate(self._variants):
            if vindex in scores:
                continue
            char = char_scores.get(vindex, 0.0)
            tok = 0.0
            if vindex in touched:
                owner = variant.candidate
                if owner not in precisions:
                    precisions[owner] = self._coverage(self._candidate_tokens[owner], sims, weights)
                tok = self._token_f1(variant, precisions[owner], sims)
            if not query.tokens and not variant.token_ids:
                tok = char  # nothing but stopwords on both sides: characters decide
            scores[vindex] = min(1.0, (1.0 - char_weight) * tok + char_weight * char)
        return scores

    def rank(self, text: str, limit: int | None = 5) -> list[Match]:
        """Candidates by raw score, best first (``confidence == score`` here)."""
        best: dict[int, tuple[float, int]] = {}
        for vindex, score in self._variant_scores(text).items():
            owner = self._variants[vindex].candidate
            if owner not in best or score > best[owner][0]:
                best[owner] = (score, vindex)
        order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
        if limit is not None:
            order = order[:limit]
        out: list[Match] = []
        for cand_index, (score, vindex) in order:
            cand = self._candidates[cand_index]
            out.append(Match(cand.key, cand.group, score, score, self._variants[vindex].text))
        return out

    def best(self, text: str) -> Match | None:
        """The best candidate with an ambiguity-adjusted confidence, or ``None``
        if there are no candidates or the text has no words at all."""
        ranked = self.rank(text, limit=None)
        if not ranked:
            return None
        top = ranked[0]
        runner = next((m for m in ranked[1:] if m.group != top.group), None)
        confidence = top.score
        if runner is not None:
            gap = top.score - runner.score
            exempt = top.score >= 1.0 and runner.score < 1.0
            if gap < AMBIGUITY_MARGIN and not exempt:
                confidence = top.score * (1 - AMBIGUITY_PENALTY * (1 - gap / AMBIGUITY_MARGIN))
        return Match(
            top.key,
            top.group,
            max(0.0, min(1.0, confidence)),
            top.score,
            top.variant,
            (runner.key, runner.score) if runner else None,
        )
