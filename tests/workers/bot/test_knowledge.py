"""Knowledge-base loading, validation and resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.bot.knowledge import (
    Entry,
    KnowledgeBase,
    KnowledgeBaseError,
    LocalizedText,
    QuickReply,
    load,
)

from ._support import EXAMPLES, example_kb

MINIMAL = """
entries:
  - id: hi
    intent: greeting
    questions: [你好, hello]
    answer: 您好
"""


def problems_of(exc: pytest.ExceptionInfo[KnowledgeBaseError]) -> list[str]:
    return [str(p) for p in exc.value.problems]


# --------------------------------------------------------------------------- examples


def test_example_yaml_loads() -> None:
    kb = example_kb()
    assert kb.settings.name == "小鹿旗舰店"
    assert kb.settings.language == "zh"
    assert {e.intent for e in kb.entries} >= {
        "greeting",
        "order_status",
        "shipping",
        "returns",
        "refund",
        "size",
        "human",
    }
    assert [r.id for r in kb.rules] == ["invoice", "sf_express", "thanks"]
    logistics = kb.entry("logistics")
    assert logistics.needs_order and not kb.entry("returns").needs_order
    assert logistics.answer.get("en").startswith("Your order {order_id}")
    assert logistics.line is not None and logistics.line > 1


def test_example_csv_loads_with_the_same_behaviour() -> None:
    kb = load(EXAMPLES / "kb.csv")
    assert kb.settings.name == "小鹿旗舰店"
    assert [q.goto for q in kb.settings.welcome_quick_replies] == [
        "order_status",
        "logistics",
        "returns",
        None,
    ]
    assert kb.entry("logistics").questions == (
        "我的快递到哪了",
        "查物流",
        "物流信息",
        "where is my parcel",
        "track my package",
    )
    assert kb.entry("returns").answer.get("en").startswith("Returns are accepted")
    assert kb.entry("returns").answer.get("zh").startswith("支持7天")
    assert kb.message("handoff_requested", "zh") == "好的亲，正在为您转接人工客服，请稍候~"
    # Only Chinese was overridden: English falls back to the built-in text.
    assert kb.message("handoff_requested", "en").startswith("Sure, connecting you")
    resolution = kb.resolve("尺寸怎么选")  # CSV synonym 尺寸 -> 尺码
    assert resolution is not None and resolution.id == "size"
    invoice = kb.resolve("能开发票吗")
    assert invoice is not None and (invoice.source, invoice.id) == ("keyword", "invoice")


def test_gb18030_csv_from_excel_loads(tmp_path: Path) -> None:
    path = tmp_path / "kb.csv"
    path.write_bytes("id,intent,questions,answer\nhi,greeting,你好|在吗,亲在的\n".encode("gb18030"))
    kb = load(path)
    assert kb.entry("hi").questions == ("你好", "在吗")


def test_yml_suffix_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "shop.YML"
    path.write_bytes(("\ufeff" + MINIMAL).encode("utf-8"))
    assert load(path).entry("hi").answer.get("zh") == "您好"
    assert KnowledgeBase.load(path).entry("hi").intent == "greeting"


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "kb.json"
    path.write_text("{}")
    with pytest.raises(KnowledgeBaseError, match="unsupported suffix"):
        load(path)


# --------------------------------------------------------------------------- YAML errors


def test_yaml_syntax_error_names_the_line() -> None:
    text = "entries:\n  - id: hi\n    intent: greeting\n    questions: [你好\n    answer: x\n"
    with pytest.raises(KnowledgeBaseError) as exc:
        KnowledgeBase.from_yaml(text, source="shop.yaml")
    assert exc.value.line is not None and exc.value.line >= 4
    assert "shop.yaml" in str(exc.value)


def test_bad_file_reports_every_problem_with_line_and_entry() -> None:
    text = """\
entries:
  - id: ok
    intent: greeting
    questions: [你好]
    answer: 您好
  - id: bad_template
    intent: shipping
    questions: [快递到哪了]
    answer: 您的订单{ordr_id}已发货
  - id: missing_answer
    intent: shipping
    questions: [什么时候发货]
  - id: typo
    intent: size
    question: [穿什么码]
    answer: 发身高体重给我
"""
    with pytest.raises(KnowledgeBaseError) as exc:
        KnowledgeBase.from_yaml(text, source="kb.yaml")
    assert problems_of(exc) == [
        "line 10: entry 'missing_answer': missing field 'answer'",
        "line 13: entry 'typo': missing field 'questions'",
        "line 15: entry 'typo': unknown field 'question' (did you mean 'questions'?)",
    ]
    message = str(exc.value)
    assert message.startswith("invalid knowledge base kb.yaml (")
    # The template error is a cross-check: reported once the file parses.
    fixed = text.replace("question: [", "questions: [").replace(
        "    questions: [什么时候发货]\n", "    questions: [什么时候发货]\n    answer: 48小时内\n"
    )
    with pytest.raises(KnowledgeBaseError) as exc2:
        KnowledgeBase.from_yaml(fixed, source="kb.yaml")
    assert problems_of(exc2) == [
        "line 6: entry 'bad_template': answer (zh): unknown variable {ordr_id} (known: "
        "{amount}, {carrier}, {customer_name}, {eta}, {items}, {order_id}, {order_status}, "
        "{shop_name}, {tracking_no})"
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty knowledge base"),
        ("- a\n- b\n", "document: expected a mapping, got a list"),
        ("entrys: []\n", "unknown field 'entrys' (did you mean 'entries'?)"),
        ("entries: []\n", "no entries and no keyword rules"),
        ("version: 2\n" + MINIMAL, "unsupported version '2'"),
        (
            MINIMAL + "  - id: hi\n    intent: greeting\n    questions: [嗨]\n    answer: x\n",
            "entry 'hi': duplicate id (first at line 3)",
        ),
        (
            MINIMAL + "  - id: hi2\n    intent: greeting\n    questions: [Hello!]\n    answer: x\n",
            "question 'Hello!' is also a question of entry 'hi'",
        ),
        (
            MINIMAL + "    quick_replies: [{text: 退货, goto: returns}]\n",
            "quick reply goto 'returns': no such entry",
        ),
        (MINIMAL.replace("answer: 您好", "answer: {fr: Bonjour}"), "unknown language 'fr'"),
        (MINIMAL.replace("intent: greeting", "intent: 问候 语"), "intent '问候 语' must match"),
        (
            MINIMAL.replace("answer: 您好", "answer: '{order_id.__class__}'"),
            "not a plain variable name",
        ),
        (MINIMAL.replace("answer: 您好", "answer: '{}'"), "positional field"),
        (MINIMAL.replace("answer: 您好", "answer: '{order_id!r}'"), "conversion or format spec"),
        (MINIMAL.replace("answer: 您好", "answer: '您好 {'"), "bad template syntax"),
        ("entries:\n  - id: a\n    id: b\n", "duplicate key 'id'"),
        ("shop: {language: fr}\n" + MINIMAL, "language 'fr': expected one of zh, en"),
        (
            "shop:\n  messages: {handof_requested: 好的}\n" + MINIMAL,
            "unknown message 'handof_requested' (did you mean 'handoff_requested'?)",
        ),
        ("shop:\n  messages: {away: '{back}'}\n" + MINIMAL, "unknown variable {back}"),
        ("keywords:\n  - {keywords: [发票], match: fuzzy, answer: x}\n", "match 'fuzzy'"),
        (
            "keywords:\n  - {match: exact, answer: x}\n",
            "keyword rule 'kw1': missing field 'keywords'",
        ),
        (
            "shop:\n  welcome_quick_replies: ["
            + ", ".join(str(i) for i in range(11))
            + "]\n"
            + MINIMAL,
            "11 quick replies; at most 10",
        ),
    ],
)
def test_invalid_yaml(text: str, fragment: str) -> None:
    with pytest.raises(KnowledgeBaseError) as exc:
        KnowledgeBase.from_yaml(text)
    assert fragment in str(exc.value)


def test_scalars_are_text_not_yaml_booleans_or_numbers() -> None:
    kb = KnowledgeBase.from_yaml("""
keywords:
  - {keywords: [no, 12315, 0123], match: exact, answer: yes}
entries:
  - {id: "007", intent: greeting, questions: [on], answer: off}
""")
    assert kb.rules[0].keywords == ("no", "12315", "0123")
    assert kb.rules[0].answer.get("zh") == "yes"
    assert kb.entry("007").answer.get(None) == "off"


# --------------------------------------------------------------------------- CSV errors


def test_csv_errors_name_the_line() -> None:
    text = (
        "type,id,intent,questions,answer\n"
        "entry,hi,greeting,你好,您好\n"
        "entry,ship,shipping,快递到哪了,订单{ordr}\n"
        'entry,multi,size,"尺码\n怎么选",发身高\n'
        "entry,x,size,,发身高\n"
    )
    with pytest.raises(KnowledgeBaseError) as exc:
        KnowledgeBase.from_csv(text, source="kb.csv")
    assert problems_of(exc) == [
        "line 3: entry 'ship': answer (zh): unknown variable {ordr} "
        "(known: {amount}, {carrier}, {customer_name}, {eta}, {items}, "
        "{order_id}, {order_status}, {shop_name}, {tracking_no})",
        "line 6: entry 'x': needs at least one question",
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty file: expected a header row"),
        ("id,intent,question,answer\n", "unknown column 'question' (did you mean 'questions'?)"),
        ("id,intent,questions\n", "missing column 'answer'"),
        ("type,id,answer\nfaq,a,b\n", "line 2: csv: unknown type 'faq'"),
        ("id,answer\na,b,c\n", "line 2: csv: 3 cells but only 2 columns"),
        ("id,intent,questions,answer\nhi,greeting,你好,\n", "line 2: entry 'hi': answer is empty"),
        (
            "id,intent,questions,answer,quick_replies\nhi,greeting,你好,您好,退货 -> nowhere\n",
            "line 2: entry 'hi': quick reply goto 'nowhere': no such entry",
        ),
    ],
)
def test_invalid_csv(text: str, fragment: str) -> None:
    with pytest.raises(KnowledgeBaseError) as exc:
        KnowledgeBase.from_csv(text)
    assert fragment in str(exc.value)


def test_csv_keyword_and_setting_rows() -> None:
    kb = KnowledgeBase.from_csv(
        "type,id,intent,questions,keywords,match,answer,answer_en,quick_replies\n"
        "setting,language,,,,,en,,\n"
        "setting,welcome,,,,,,,\n"
        "keyword,,,,hi|hello,exact,Hello!,,\n"
        "entry,ship,shipping,when will you ship,,,Within 48 hours.,,\n"
    )
    assert kb.settings.language == "en"
    assert kb.settings.welcome_enabled is False
    assert kb.rules[0].id == "kw1" and kb.rules[0].match == "exact"
    assert kb.entry("ship").answer.texts == (("en", "Within 48 hours."),)


# --------------------------------------------------------------------------- resolution


KEYWORDS_KB = """
keywords:
  - id: exact_hi
    match: exact
    keywords: [在吗]
    answer: 在的
  - id: contains_sf
    keywords: [顺丰]
    answer: 可以发顺丰
  - id: contains_invoice
    keywords: [invoice]
    answer: We issue invoices.
entries:
  - id: greeting
    intent: greeting
    questions: [在吗, 你好]
    answer: 您好
  - id: carrier
    intent: shipping
    questions: [可以发顺丰吗, 发什么快递]
    answer: 默认中通
    quick_replies:
      - {text: {zh: 退货怎么办, en: Returns}, goto: returns}
  - id: returns
    intent: returns
    questions: [怎么退货]
    answer: 7天无理由
"""


def test_keyword_rules_take_precedence_over_fuzzy_matching() -> None:
    kb = KnowledgeBase.from_yaml(KEYWORDS_KB)
    # Both are exact questions of entries, yet the keyword rules answer.
    exact = kb.resolve("在吗？")
    assert exact is not None and (exact.source, exact.id, exact.confidence) == (
        "keyword",
        "exact_hi",
        1.0,
    )
    contains = kb.resolve("可以发顺丰吗")
    assert contains is not None and (contains.source, contains.id) == ("keyword", "contains_sf")
    # An exact rule matches the whole message only; contains on words only.
    longer = kb.resolve("在吗 你好")
    assert longer is not None and longer.source == "question"
    plural = kb.resolve("Invoices?")
    assert plural is not None and plural.id == "contains_invoice"
    not_word = kb.resolve("invoiced")
    assert not_word is None or not_word.source != "keyword"


def test_exact_rules_are_tried_before_contains_rules() -> None:
    kb = KnowledgeBase.from_yaml("""
keywords:
  - {id: c, keywords: [顺丰], answer: contains}
  - {id: e, match: exact, keywords: [顺丰], answer: exact}
""")
    resolution = kb.resolve("顺丰")
    assert resolution is not None and resolution.id == "e"


def test_quick_reply_goto_is_an_exact_alias_in_every_language() -> None:
    kb = KnowledgeBase.from_yaml(KEYWORDS_KB)
    for text in ("退货怎么办", "returns", "Returns!"):
        resolution = kb.resolve(text)
        assert resolution is not None
        assert (resolution.source, resolution.id, resolution.confidence) == (
            "quick_reply",
            "returns",
            1.0,
        )


def test_resolve_strips_order_ids_before_matching() -> None:
    kb = example_kb()
    plain = kb.resolve("where is my order")
    with_id = kb.resolve("where is my order 4412345678901234567")
    assert plain is not None and with_id is not None
    assert with_id.id == plain.id == "order_status"
    assert with_id.confidence == plain.confidence == 1.0


def test_programmatic_knowledge_base_is_validated() -> None:
    entry = Entry(
        "a",
        "greeting",
        ("你好",),
        LocalizedText.of("您好"),
        (QuickReply(LocalizedText.of("x"), goto="missing"),),
    )
    with pytest.raises(KnowledgeBaseError, match="goto 'missing': no such entry"):
        KnowledgeBase(entries=[entry])
    ok = KnowledgeBase(entries=[Entry("a", "greeting", ("你好",), LocalizedText.of("您好"))])
    assert ok.resolve("你好") is not None


def test_message_override_falls_back_per_language() -> None:
    kb = KnowledgeBase.from_yaml("shop:\n  messages: {away: '{back_at}再见'}\n" + MINIMAL)
    assert kb.message("away", "zh") == "{back_at}再见"
    assert kb.message("away", "en").startswith("Our team is offline")
    assert kb.message("away", None) == "{back_at}再见"  # shop language
