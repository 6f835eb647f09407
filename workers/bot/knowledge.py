"""A shop's knowledge base: FAQ entries, keyword auto-reply rules, shop settings.

YAML layout (all scalars are read as text -- no ``yes``/``no`` -> boolean or
``0123`` -> octal surprises; a plain string answer is in the shop's language,
a mapping gives one text per language)::

    version: 1                       # optional
    shop:
      name: 小鹿旗舰店
      language: zh                   # zh | en: default language of the shop
      welcome: {zh: "...", en: "..."}   # "" disables the auto-welcome
      welcome_quick_replies: [查订单, 物流查询, 转人工]
      messages: {handoff_requested: "..."}   # overrides, see messages.py
    synonyms:
      快递: [包裹, 物流]
    keywords:                        # checked before any fuzzy matching
      - id: invoice                  # optional (default kw1, kw2, ...)
        match: contains              # contains (default) | exact
        keywords: [发票, invoice]
        answer: 支持开具电子发票 ...
        intent: invoice              # optional, default "keyword"
    entries:
      - id: logistics
        intent: shipping
        questions: [我的快递到哪了, where is my parcel]
        answer: {zh: "您的订单{order_id}由{carrier}承运 ...", en: "..."}
        quick_replies:
          - 修改地址                 # a tap sends this text (matched like any message)
          - {text: {zh: 退货流程, en: How do I return it}, goto: returns}

A quick reply with ``goto`` is also an exact alias of the target entry, so the
tap lands there with confidence 1.0 whatever the fuzzy matcher thinks.

CSV layout (for spreadsheets; UTF-8 with or without BOM, or GB18030 via
:func:`load`): a header row with any of the columns ``type, id, intent,
questions, keywords, match, answer, answer_zh, answer_en, quick_replies``.
``type`` is ``entry`` (default), ``keyword``, ``synonym`` (``id`` = canonical
term, ``keywords`` = variants) or ``setting`` (``id`` = ``name``, ``language``,
``welcome`` or a message key; ``answer``/``answer_*`` = its text;
``quick_replies`` on the ``welcome`` row). List cells are separated by ``|``
or newlines; a quick reply ``退货流程 -> returns`` has a ``goto``.

Every problem found is reported at once in a :class:`KnowledgeBaseError`
naming the line and the entry.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml  # type: ignore[import-untyped, unused-ignore]

from .matching import (
    SUPPORTED_LANGUAGES,
    Candidate,
    Language,
    Match,
    Matcher,
    char_view,
    find_order_id,
    normalize,
    term_pattern,
)
from .messages import DEFAULT_MESSAGES, MESSAGE_VARIABLES
from .templates import ENTRY_VARIABLES, ORDER_VARIABLES, check_template, template_fields

__all__ = [
    "DEFAULT_RULE_INTENT",
    "ID_PATTERN",
    "MAX_QUICK_REPLIES",
    "MAX_QUICK_REPLY_CHARS",
    "Entry",
    "KeywordRule",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "LocalizedText",
    "Problem",
    "QuickReply",
    "Resolution",
    "ShopSettings",
    "load",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Entry ids, rule ids and intents."""
MAX_QUICK_REPLIES = 10
"""Per reply; the protocol's QuickRepliesBody allows 10 options."""
MAX_QUICK_REPLY_CHARS = 256
"""Per option; the protocol's ShortText limit."""
DEFAULT_RULE_INTENT = "keyword"
"""Intent reported for a keyword rule that does not name one."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class LocalizedText:
    """One text per language; the first is the fallback."""

    texts: tuple[tuple[Language, str], ...]

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("LocalizedText needs at least one text")

    @classmethod
    def of(cls, text: str | Mapping[Language, str], default: Language = "zh") -> LocalizedText:
        if isinstance(text, str):
            return cls(((default, text),))
        return cls(tuple(text.items()))

    def get(self, language: Language | None) -> str:
        for lang, text in self.texts:
            if lang == language:
                return text
        return self.texts[0][1]

    def has(self, language: Language) -> bool:
        return any(lang == language for lang, _ in self.texts)

    def all(self) -> tuple[str, ...]:
        """Every language's text."""
        return tuple(text for _, text in self.texts)

    @property
    def fields(self) -> frozenset[str]:
        out: set[str] = set()
        for _, text in self.texts:
            out |= template_fields(text)
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class QuickReply:
    """A button; tapping it sends ``text`` (in the customer's language)."""

    text: LocalizedText
    goto: str | None = None
    """Entry id the tap resolves to (exact alias); ``None``: matched like any text."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    intent: str
    questions: tuple[str, ...]
    answer: LocalizedText
    quick_replies: tuple[QuickReply, ...] = ()
    line: int | None = None
    """Where it was defined, for error messages."""

    @property
    def needs_order(self) -> bool:
        """Whether the answer uses order variables (the engine looks the order up)."""
        return bool(self.answer.fields & ORDER_VARIABLES)


@dataclass(frozen=True, slots=True)
class KeywordRule:
    """Keyword auto-reply: ``exact`` (the whole message, ignoring case, spaces and
    punctuation) or ``contains`` (Chinese keywords as substrings, others as whole
    words). Rules are tried in file order, all ``exact`` ones first, and win over
    the fuzzy matcher."""

    id: str
    keywords: tuple[str, ...]
    answer: LocalizedText
    match: Literal["exact", "contains"] = "contains"
    intent: str = DEFAULT_RULE_INTENT
    quick_replies: tuple[QuickReply, ...] = ()
    line: int | None = None

    @property
    def needs_order(self) -> bool:
        return bool(self.answer.fields & ORDER_VARIABLES)


@dataclass(frozen=True, slots=True)
class ShopSettings:
    name: str | None = None
    """Shown as ``{shop_name}``; the engine falls back to the shop id."""
    language: Language = "zh"
    welcome_enabled: bool = True
    welcome_quick_replies: tuple[QuickReply, ...] = ()
    messages: Mapping[str, LocalizedText] = field(default_factory=dict)
    """Overrides of :data:`messages.DEFAULT_MESSAGES` (``welcome`` included)."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the knowledge base has to say about a message."""

    source: Literal["keyword", "quick_reply", "question", "context"]
    """``context``: inferred from the conversation (the engine's order follow-up)."""
    id: str
    """Entry id or keyword-rule id."""
    intent: str
    answer: LocalizedText
    quick_replies: tuple[QuickReply, ...]
    confidence: float
    """1.0 for keyword rules and quick-reply aliases; the matcher's confidence otherwise."""
    needs_order: bool
    match: Match | None = None
    """Fuzzy-match details (``source == "question"``)."""


@dataclass(frozen=True, slots=True)
class Problem:
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        prefix = f"line {self.line}: " if self.line is not None else ""
        return f"{prefix}{self.where}: {self.message}"


class KnowledgeBaseError(ValueError):
    """An invalid knowledge base; ``problems`` lists every issue found."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = tuple(sorted(problems, key=lambda p: (p.line is None, p.line or 0)))
        count = len(self.problems)
        lines = "\n".join(f"  {source}: {p}" for p in self.problems)
        super().__init__(
            f"invalid knowledge base {source} ({count} problem{'s' if count != 1 else ''}):\n{lines}"
        )

    @property
    def line(self) -> int | None:
        """Line of the first problem."""
        return self.problems[0].line if self.problems else None


# --------------------------------------------------------------------------- knowledge base


class KnowledgeBase:
    """One shop's answers. Immutable after construction; validation happens here,
    so a programmatically built knowledge base gets the same checks as a file."""

    def __init__(
        self,
        *,
        entries: Sequence[Entry] = (),
        rules: Sequence[KeywordRule] = (),
        settings: ShopSettings | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        source: str = "<knowledge base>",
    ) -> None:
        self._entries = tuple(entries)
        self._rules = tuple(rules)
        self._settings = settings or ShopSettings()
        self._synonyms = {k: tuple(v) for k, v in (synonyms or {}).items()}
        self._source = source
        self._by_id = {e.id: e for e in self._entries}
        self._matcher = Matcher(
            [Candidate(e.id, e.intent, e.questions) for e in self._entries],
            synonyms=self._synonyms,
        )
        problems = _cross_check(self._entries, self._rules, self._settings, self._matcher)
        if problems:
            raise KnowledgeBaseError(source, problems)
        self._aliases: dict[str, str] = {}
        reply_lists = [e.quick_replies for e in self._entries]
        reply_lists += [r.quick_replies for r in self._rules]
        reply_lists.append(self._settings.welcome_quick_replies)
        for replies in reply_lists:
            for reply in replies:
                if reply.goto is not None:
                    for text in reply.text.all():
                        self._aliases[self._matcher.key(text)] = reply.goto
        self._exact_rules = [
            (rule, {char_view(normalize(k)) for k in rule.keywords})
            for rule in self._rules
            if rule.match == "exact"
        ]
        self._contains_rules = [
            (rule, re.compile("|".join(term_pattern(normalize(k)) for k in rule.keywords)))
            for rule in self._rules
            if rule.match == "contains"
        ]

    # -- construction from text -------------------------------------------------

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<yaml>") -> KnowledgeBase:
        return _parse_document(_yaml_tree(text, source), source)

    @classmethod
    def from_csv(cls, text: str, *, source: str = "<csv>") -> KnowledgeBase:
        return _parse_document(_csv_tree(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> KnowledgeBase:
        return load(path)

    # -- accessors --------------------------------------------------------------

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    @property
    def rules(self) -> tuple[KeywordRule, ...]:
        return self._rules

    @property
    def settings(self) -> ShopSettings:
        return self._settings

    @property
    def source(self) -> str:
        return self._source

    @property
    def matcher(self) -> Matcher:
        return self._matcher

    def entry(self, entry_id: str) -> Entry:
        return self._by_id[entry_id]

    def message(self, key: str, language: Language | None) -> str:
        """The template for a system message: the shop's override in that language,
        else the built-in one in that language, else the override in any language."""
        lang = language or self._settings.language
        override = self._settings.messages.get(key)
        if override is not None and override.has(lang):
            return override.get(lang)
        return DEFAULT_MESSAGES[key][lang]

    # -- matching ---------------------------------------------------------------

    def resolve(self, text: str) -> Resolution | None:
        """Keyword rules (exact, then contains), then quick-reply aliases, then the
        fuzzy matcher (best entry, whatever its confidence: the caller decides).
        ``None`` when the knowledge base has no entries or the text no words."""
        normalized = normalize(text)
        key = char_view(normalized)
        if not key:
            return None
        for rule, keys in self._exact_rules:
            if key in keys:
                return self._from_rule(rule)
        for rule, pattern in self._contains_rules:
            if pattern.search(normalized):
                return self._from_rule(rule)
        target = self._aliases.get(self._matcher.key(text))
        if target is not None:
            return self._from_entry(self._by_id[target], "quick_reply", 1.0, None)
        found = find_order_id(text)
        best = self._matcher.best(found.remainder if found else text)
        if best is None:
            return None
        return self._from_entry(self._by_id[best.key], "question", best.confidence, best)

    def _from_rule(self, rule: KeywordRule) -> Resolution:
        return Resolution(
            "keyword", rule.id, rule.intent, rule.answer, rule.quick_replies, 1.0, rule.needs_order
        )

    def resolution_for(self, entry: Entry, confidence: float = 1.0) -> Resolution:
        """A ``context`` resolution of ``entry`` (for callers that infer the entry)."""
        return self._from_entry(entry, "context", confidence, None)

    def _from_entry(
        self,
        entry: Entry,
        source: Literal["quick_reply", "question", "context"],
        confidence: float,
        match: Match | None,
    ) -> Resolution:
        return Resolution(
            source,
            entry.id,
            entry.intent,
            entry.answer,
            entry.quick_replies,
            confidence,
            entry.needs_order,
            match,
        )


def load(path: str | Path) -> KnowledgeBase:
    """Load ``*.yaml``/``*.yml`` or ``*.csv`` (UTF-8, UTF-8 with BOM, or GB18030 as
    Excel saves it on Chinese Windows)."""
    path = Path(path)
    suffix = path.suffix.lower()
    data = path.read_bytes()
    if suffix in (".yaml", ".yml"):
        return KnowledgeBase.from_yaml(data.decode("utf-8-sig"), source=str(path))
    if suffix == ".csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("gb18030")
        return KnowledgeBase.from_csv(text, source=str(path))
    raise KnowledgeBaseError(
        str(path),
        [Problem(None, "file", f"unsupported suffix {suffix!r}; use .yaml, .yml or .csv")],
    )


# --------------------------------------------------------------------------- cross checks


def _where_entry(entry_id: str) -> str:
    return f"entry {entry_id!r}"


def _cross_check(
    entries: Sequence[Entry], rules: Sequence[KeywordRule], settings: ShopSettings, matcher: Matcher
) -> list[Problem]:
    problems: list[Problem] = []
    ids: dict[str, int | None] = {}
    question_owner: dict[str, str] = {}
    alias_owner: dict[str, tuple[str, str]] = {}

    def check_answer(
        text: LocalizedText, allowed: frozenset[str], line: int | None, where: str, what: str
    ) -> None:
        for lang, template in text.texts:
            problem = check_template(template, allowed)
            if problem:
                problems.append(Problem(line, where, f"{what} ({lang}): {problem}"))
            if not template.strip() and what != "welcome":
                problems.append(Problem(line, where, f"{what} ({lang}) is empty"))

    def check_replies(replies: Sequence[QuickReply], line: int | None, where: str) -> None:
        if len(replies) > MAX_QUICK_REPLIES:
            problems.append(
                Problem(line, where, f"{len(replies)} quick replies; at most {MAX_QUICK_REPLIES}")
            )
        for reply in replies:
            for text in reply.text.all():
                if not text.strip() or len(text) > MAX_QUICK_REPLY_CHARS:
                    problems.append(
                        Problem(
                            line,
                            where,
                            f"quick reply {text!r} must be 1..{MAX_QUICK_REPLY_CHARS} characters",
                        )
                    )
            if reply.goto is None:
                continue
            if reply.goto not in ids:
                hint = _did_you_mean(reply.goto, ids)
                problems.append(
                    Problem(line, where, f"quick reply goto {reply.goto!r}: no such entry{hint}")
                )
                continue
            for text in reply.text.all():
                key = matcher.key(text)
                previous = alias_owner.setdefault(key, (reply.goto, where))
                if previous[0] != reply.goto:
                    problems.append(
                        Problem(
                            line,
                            where,
                            f"quick reply {text!r} goes to "
                            f"{reply.goto!r} but in {previous[1]} to {previous[0]!r}",
                        )
                    )

    for entry in entries:
        where = _where_entry(entry.id)
        if entry.id in ids:
            problems.append(
                Problem(entry.line, where, f"duplicate id (first at line {ids[entry.id]})")
            )
        ids.setdefault(entry.id, entry.line)
        for name, value in (("id", entry.id), ("intent", entry.intent)):
            if not ID_PATTERN.fullmatch(value):
                problems.append(
                    Problem(entry.line, where, f"{name} {value!r} must match {ID_PATTERN.pattern}")
                )
        if not entry.questions:
            problems.append(Problem(entry.line, where, "needs at least one question"))
        for question in entry.questions:
            key = matcher.key(question)
            if not key:
                problems.append(Problem(entry.line, where, f"question {question!r} has no words"))
                continue
            owner = question_owner.setdefault(key, entry.id)
            if owner != entry.id:
                problems.append(
                    Problem(
                        entry.line,
                        where,
                        f"question {question!r} is also a "
                        f"question of entry {owner!r} (after normalisation)",
                    )
                )
        check_answer(entry.answer, ENTRY_VARIABLES, entry.line, where, "answer")
    for entry in entries:
        check_replies(entry.quick_replies, entry.line, _where_entry(entry.id))

    rule_ids: dict[str, int | None] = {}
    for rule in rules:
        where = f"keyword rule {rule.id!r}"
        if rule.id in rule_ids:
            problems.append(
                Problem(rule.line, where, f"duplicate id (first at line {rule_ids[rule.id]})")
            )
        rule_ids.setdefault(rule.id, rule.line)
        if not ID_PATTERN.fullmatch(rule.intent):
            problems.append(
                Problem(rule.line, where, f"intent {rule.intent!r} must match {ID_PATTERN.pattern}")
            )
        if not rule.keywords:
            problems.append(Problem(rule.line, where, "needs at least one keyword"))
        for keyword in rule.keywords:
            if not char_view(normalize(keyword)):
                problems.append(Problem(rule.line, where, f"keyword {keyword!r} has no words"))
        check_answer(rule.answer, ENTRY_VARIABLES, rule.line, where, "answer")
        check_replies(rule.quick_replies, rule.line, where)

    check_replies(settings.welcome_quick_replies, None, "shop welcome_quick_replies")
    for key, text in settings.messages.items():
        allowed = MESSAGE_VARIABLES.get(key)
        if allowed is None:
            problems.append(
                Problem(
                    None,
                    "shop messages",
                    f"unknown message {key!r}{_did_you_mean(key, MESSAGE_VARIABLES)}",
                )
            )
            continue
        check_answer(text, allowed, None, "shop messages", key)
    return problems


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- parsing


class _Located(dict[str, Any]):
    """A mapping that remembers where it (and each of its keys) was written."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self, *args: Any, line: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.line = line
        self.key_lines = {}

    def line_of(self, key: str) -> int | None:
        return self.key_lines.get(key, self.line)


class _Loader(yaml.BaseLoader):  # type: ignore[misc, unused-ignore]
    """Every scalar is a string; mappings are :class:`_Located`; duplicate keys fail."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # a _Located
        out = _Located(line=node.start_mark.line + 1)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain text", key_node.start_mark
                )
            if key in out:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            out[key] = self.construct_object(value_node, deep=deep)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out


def _yaml_tree(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # a BaseLoader: builds text, lists, mappings only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise KnowledgeBaseError(source, [Problem(line, "yaml", message)]) from None
    except yaml.YAMLError as exc:
        raise KnowledgeBaseError(source, [Problem(None, "yaml", str(exc))]) from None


_CSV_COLUMNS = (
    "type",
    "id",
    "intent",
    "questions",
    "keywords",
    "match",
    "answer",
    "answer_zh",
    "answer_en",
    "quick_replies",
)
_CSV_LIST_SPLIT = re.compile(r"\s*(?:\||\r?\n)\s*")
_CSV_GOTO_SPLIT = re.compile(r"\s*->\s*")


def _csv_list(cell: str) -> list[str]:
    return [part for part in _CSV_LIST_SPLIT.split(cell.strip()) if part]


def _csv_tree(text: str, source: str) -> _Located:
    """Turn CSV rows into the same tree the YAML loader produces."""
    text = text.lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    problems: list[Problem] = []
    try:
        header = next(reader)
    except StopIteration:
        raise KnowledgeBaseError(
            source, [Problem(1, "csv", "empty file: expected a header row")]
        ) from None
    except csv.Error as exc:
        raise KnowledgeBaseError(source, [Problem(1, "csv", str(exc))]) from None
    columns = [h.strip().lower() for h in header]
    for name in columns:
        if name not in _CSV_COLUMNS:
            problems.append(
                Problem(
                    1, "csv header", f"unknown column {name!r}{_did_you_mean(name, _CSV_COLUMNS)}"
                )
            )
    for required in ("id", "answer"):
        if required not in columns:
            problems.append(Problem(1, "csv header", f"missing column {required!r}"))
    if problems:
        raise KnowledgeBaseError(source, problems)

    rows: list[tuple[int, dict[str, str]]] = []
    line = reader.line_num + 1
    try:
        for record in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if len(record) > len(columns):
                problems.append(
                    Problem(start, "csv", f"{len(record)} cells but only {len(columns)} columns")
                )
                continue
            rows.append((start, {c: v.strip() for c, v in zip(columns, record, strict=False)}))
    except csv.Error as exc:
        raise KnowledgeBaseError(source, [Problem(line, "csv", str(exc))]) from None
    if problems:
        raise KnowledgeBaseError(source, problems)

    shop = _Located(line=None)
    messages = _Located(line=None)
    synonyms = _Located(line=None)
    keywords: list[_Located] = []
    entries: list[_Located] = []
    for start, row in rows:
        kind = row.get("type", "").lower() or "entry"
        item = _Located(line=start)
        answer: str | _Located
        texts = {lang: row.get(f"answer_{lang}", "") for lang in SUPPORTED_LANGUAGES}
        if any(texts.values()):
            answer = _Located(line=start)
            if row.get("answer"):
                answer[""] = row["answer"]
            answer.update({lang: text for lang, text in texts.items() if text})
        else:
            answer = row.get("answer", "")
        replies: list[object] = []
        for cell in _csv_list(row.get("quick_replies", "")):
            parts = _CSV_GOTO_SPLIT.split(cell, maxsplit=1)
            if len(parts) == 2:
                replies.append(_Located({"text": parts[0], "goto": parts[1]}, line=start))
            else:
                replies.append(cell)
        if kind == "entry":
            item.update(
                id=row.get("id", ""),
                intent=row.get("intent", ""),
                questions=_csv_list(row.get("questions", "")),
                answer=answer,
            )
            if replies:
                item["quick_replies"] = replies
            entries.append(item)
        elif kind == "keyword":
            item.update(keywords=_csv_list(row.get("keywords", "")), answer=answer)
            for name in ("id", "intent", "match"):
                if row.get(name):
                    item[name] = row[name]
            if replies:
                item["quick_replies"] = replies
            keywords.append(item)
        elif kind == "synonym":
            synonyms[row.get("id", "")] = _csv_list(row.get("keywords", ""))
            synonyms.key_lines[row.get("id", "")] = start
        elif kind == "setting":
            name = row.get("id", "")
            target = shop if name in ("name", "language", "welcome") else messages
            target[name] = answer
            target.key_lines[name] = start
            if name == "welcome" and replies:
                shop["welcome_quick_replies"] = replies
                shop.key_lines["welcome_quick_replies"] = start
        else:
            problems.append(
                Problem(start, "csv", f"unknown type {kind!r} (entry, keyword, synonym or setting)")
            )
    if problems:
        raise KnowledgeBaseError(source, problems)
    if messages:
        shop["messages"] = messages
    tree = _Located(line=None)
    tree.update(shop=shop, synonyms=synonyms, keywords=keywords, entries=entries)
    return tree


class _Parser:
    """Turns a loaded tree into model objects, collecting problems instead of
    stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.language: Language = "zh"

    def problem(self, line: int | None, where: str, message: str) -> None:
        self.problems.append(Problem(line, where, message))

    def keys(self, node: _Located, allowed: Sequence[str], where: str) -> None:
        for key in node:
            if key not in allowed:
                self.problem(
                    node.line_of(key), where, f"unknown field {key!r}{_did_you_mean(key, allowed)}"
                )

    def mapping(self, value: object, line: int | None, where: str) -> _Located | None:
        if isinstance(value, _Located):
            return value
        self.problem(line, where, f"expected a mapping, got {_kind(value)}")
        return None

    def text(
        self, value: object, line: int | None, where: str, name: str, *, required: bool = True
    ) -> str | None:
        if isinstance(value, str) and (value.strip() or not required):
            return value.strip()
        if isinstance(value, str):
            self.problem(line, where, f"{name} is empty")
        else:
            self.problem(line, where, f"{name}: expected text, got {_kind(value)}")
        return None

    def text_list(self, value: object, line: int | None, where: str, name: str) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.problem(line, where, f"{name}: expected a list of text, got {_kind(value)}")
            return []
        out: list[str] = []
        for item in items:
            text = self.text(item, line, where, f"{name} item")
            if text is not None:
                out.append(text)
        return out

    def localized(
        self, value: object, line: int | None, where: str, name: str, *, allow_empty: bool = False
    ) -> LocalizedText | None:
        if isinstance(value, str):
            if not value.strip() and not allow_empty:
                self.problem(line, where, f"{name} is empty")
                return None
            return LocalizedText(((self.language, value.strip()),))
        if isinstance(value, _Located):
            texts: dict[Language, str] = {}
            before = len(self.problems)
            for lang, text in value.items():
                key = _language(lang) if lang else self.language  # CSV: "" = shop's language
                if key is None:
                    self.problem(
                        value.line_of(lang),
                        where,
                        f"{name}: unknown language "
                        f"{lang!r} (supported: {', '.join(SUPPORTED_LANGUAGES)})",
                    )
                    continue
                checked = self.text(text, value.line_of(lang), where, f"{name} ({lang})")
                if checked is not None:
                    texts.setdefault(key, checked)
            if not texts:
                if len(self.problems) == before:
                    self.problem(line, where, f"{name} has no text")
                return None
            ordered = sorted(texts.items(), key=lambda kv: kv[0] != self.language)
            return LocalizedText(tuple(ordered))
        self.problem(
            line,
            where,
            f"{name}: expected text or a mapping of language to text, got {_kind(value)}",
        )
        return None

    def quick_replies(self, value: object, line: int | None, where: str) -> tuple[QuickReply, ...]:
        if not isinstance(value, list):
            self.problem(line, where, f"quick_replies: expected a list, got {_kind(value)}")
            return ()
        out: list[QuickReply] = []
        for item in value:
            if isinstance(item, _Located) and "text" in item:
                self.keys(item, ("text", "goto"), where)
                text = self.localized(item["text"], item.line_of("text"), where, "quick reply")
                goto = None
                if "goto" in item:
                    goto = self.text(item["goto"], item.line_of("goto"), where, "goto")
                if text is not None:
                    out.append(QuickReply(text, goto))
            else:
                text = self.localized(item, line, where, "quick reply")
                if text is not None:
                    out.append(QuickReply(text))
        return tuple(out)


def _language(value: str) -> Language | None:
    for lang in SUPPORTED_LANGUAGES:
        if lang == value:
            return lang
    return None


def _kind(value: object) -> str:
    if isinstance(value, _Located):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return type(value).__name__


_TOP_KEYS = ("version", "shop", "synonyms", "keywords", "entries")
_SHOP_KEYS = ("name", "language", "welcome", "welcome_quick_replies", "messages")
_ENTRY_KEYS = ("id", "intent", "questions", "answer", "quick_replies")
_RULE_KEYS = ("id", "keywords", "match", "answer", "intent", "quick_replies")


def _parse_document(tree: object, source: str) -> KnowledgeBase:
    p = _Parser()
    if tree is None or tree == "":
        raise KnowledgeBaseError(source, [Problem(1, "document", "empty knowledge base")])
    doc = p.mapping(tree, 1, "document")
    if doc is None:
        raise KnowledgeBaseError(source, p.problems)
    p.keys(doc, _TOP_KEYS, "document")
    if "version" in doc and doc["version"] != "1":
        p.problem(
            doc.line_of("version"),
            "document",
            f"unsupported version {doc['version']!r} (this reader knows version 1)",
        )

    settings = _parse_shop(p, doc)
    synonyms = _parse_synonyms(p, doc)
    rules: list[KeywordRule] = []
    raw_rules = doc.get("keywords", [])
    if not isinstance(raw_rules, list):
        p.problem(doc.line_of("keywords"), "keywords", f"expected a list, got {_kind(raw_rules)}")
        raw_rules = []
    for index, raw in enumerate(raw_rules, 1):
        rule = _parse_rule(p, raw, index, doc.line_of("keywords"))
        if rule is not None:
            rules.append(rule)
    entries: list[Entry] = []
    raw_entries = doc.get("entries", [])
    if not isinstance(raw_entries, list):
        p.problem(doc.line_of("entries"), "entries", f"expected a list, got {_kind(raw_entries)}")
        raw_entries = []
    for index, raw in enumerate(raw_entries, 1):
        entry = _parse_entry(p, raw, index, doc.line_of("entries"))
        if entry is not None:
            entries.append(entry)
    if not entries and not rules and not p.problems:
        p.problem(None, "document", "no entries and no keyword rules")

    if p.problems:
        # Cross-checks (duplicate ids, goto targets, templates) run once the
        # file parses: on a half-parsed file they would report noise.
        raise KnowledgeBaseError(source, p.problems)
    return KnowledgeBase(
        entries=entries, rules=rules, settings=settings, synonyms=synonyms, source=source
    )


def _parse_shop(p: _Parser, doc: _Located) -> ShopSettings:
    raw = doc.get("shop")
    if raw is None:
        return ShopSettings()
    shop = p.mapping(raw, doc.line_of("shop"), "shop")
    if shop is None:
        return ShopSettings()
    p.keys(shop, _SHOP_KEYS, "shop")
    if "language" in shop:
        lang = shop["language"]
        checked = _language(lang) if isinstance(lang, str) else None
        if checked is not None:
            p.language = checked
        else:
            p.problem(
                shop.line_of("language"),
                "shop",
                f"language {lang!r}: expected one of {', '.join(SUPPORTED_LANGUAGES)}",
            )
    name = p.text(shop["name"], shop.line_of("name"), "shop", "name") if "name" in shop else None
    messages: dict[str, LocalizedText] = {}
    welcome_enabled = True
    if "welcome" in shop:
        raw_welcome = shop["welcome"]
        if isinstance(raw_welcome, str) and not raw_welcome.strip():
            welcome_enabled = False
        else:
            welcome = p.localized(raw_welcome, shop.line_of("welcome"), "shop", "welcome")
            if welcome is not None:
                messages["welcome"] = welcome
    replies: tuple[QuickReply, ...] = ()
    if "welcome_quick_replies" in shop:
        replies = p.quick_replies(
            shop["welcome_quick_replies"],
            shop.line_of("welcome_quick_replies"),
            "shop welcome_quick_replies",
        )
    if "messages" in shop:
        raw_messages = p.mapping(shop["messages"], shop.line_of("messages"), "shop messages")
        for key, value in (raw_messages or {}).items():
            text = p.localized(
                value, raw_messages.line_of(key) if raw_messages else None, "shop messages", key
            )
            if text is not None:
                messages[key] = text
    return ShopSettings(
        name=name,
        language=p.language,
        welcome_enabled=welcome_enabled,
        welcome_quick_replies=replies,
        messages=messages,
    )


def _parse_synonyms(p: _Parser, doc: _Located) -> dict[str, list[str]]:
    if "synonyms" not in doc:
        return {}
    raw = p.mapping(doc["synonyms"], doc.line_of("synonyms"), "synonyms")
    out: dict[str, list[str]] = {}
    for canonical, variants in (raw or {}).items():
        line = raw.line_of(canonical) if raw is not None else None
        where = f"synonyms {canonical!r}"
        if not canonical.strip():
            p.problem(line, "synonyms", "empty canonical term")
            continue
        out[canonical] = p.text_list(variants, line, where, "variants")
    return out


def _parse_rule(p: _Parser, raw: object, index: int, list_line: int | None) -> KeywordRule | None:
    node = p.mapping(raw, list_line, f"keyword rule #{index}")
    if node is None:
        return None
    rule_id = node.get("id") if isinstance(node.get("id"), str) else None
    rule_id = (rule_id or "").strip() or f"kw{index}"
    where = f"keyword rule {rule_id!r}"
    p.keys(node, _RULE_KEYS, where)
    before = len(p.problems)
    keywords = (
        p.text_list(node.get("keywords"), node.line_of("keywords"), where, "keywords")
        if "keywords" in node
        else []
    )
    if "keywords" not in node:
        p.problem(node.line, where, "missing field 'keywords'")
    match = node.get("match", "contains")
    if match not in ("exact", "contains"):
        p.problem(node.line_of("match"), where, f"match {match!r}: expected 'exact' or 'contains'")
        match = "contains"
    answer = _required_localized(p, node, "answer", where)
    intent = (
        p.text(node["intent"], node.line_of("intent"), where, "intent")
        if "intent" in node
        else DEFAULT_RULE_INTENT
    )
    replies = (
        p.quick_replies(node["quick_replies"], node.line_of("quick_replies"), where)
        if "quick_replies" in node
        else ()
    )
    if len(p.problems) > before or answer is None or intent is None:
        return None
    return KeywordRule(rule_id, tuple(keywords), answer, match, intent, replies, node.line)


def _parse_entry(p: _Parser, raw: object, index: int, list_line: int | None) -> Entry | None:
    node = p.mapping(raw, list_line, f"entry #{index}")
    if node is None:
        return None
    raw_id = node.get("id")
    entry_id = raw_id.strip() if isinstance(raw_id, str) else ""
    where = _where_entry(entry_id) if entry_id else f"entry #{index}"
    p.keys(node, _ENTRY_KEYS, where)
    before = len(p.problems)
    if not entry_id:
        p.problem(node.line_of("id"), where, "missing id")
    intent = (
        p.text(node.get("intent"), node.line_of("intent"), where, "intent")
        if "intent" in node
        else None
    )
    if "intent" not in node:
        p.problem(node.line, where, "missing field 'intent'")
    questions = (
        p.text_list(node.get("questions"), node.line_of("questions"), where, "questions")
        if "questions" in node
        else []
    )
    if "questions" not in node:
        p.problem(node.line, where, "missing field 'questions'")
    answer = _required_localized(p, node, "answer", where)
    replies = (
        p.quick_replies(node["quick_replies"], node.line_of("quick_replies"), where)
        if "quick_replies" in node
        else ()
    )
    if len(p.problems) > before or answer is None or intent is None:
        return None
    return Entry(entry_id, intent, tuple(questions), answer, replies, node.line)


def _required_localized(p: _Parser, node: _Located, name: str, where: str) -> LocalizedText | None:
    if name not in node:
        p.problem(node.line, where, f"missing field {name!r}")
        return None
    return p.localized(node[name], node.line_of(name), where, name)
