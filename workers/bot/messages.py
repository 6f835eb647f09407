"""Built-in system messages (Chinese and English) and the variables each may use.

A shop overrides any of them in its knowledge base (``shop.messages`` in YAML,
``setting`` rows in CSV). ``{back_at}`` is a localised "when humans are back"
phrase such as ``明天 09:00`` / ``tomorrow at 09:00 (UTC+08:00)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from .matching import SUPPORTED_LANGUAGES, Language
from .templates import CONTEXT_VARIABLES, ORDER_VARIABLES

__all__ = ["DEFAULT_MESSAGES", "MESSAGE_VARIABLES", "SUPPORTED_LANGUAGES", "Language", "MessageKey"]

MessageKey = Literal[
    "welcome",
    "away",
    "away_no_schedule",
    "handoff_requested",
    "handoff_complaint",
    "handoff_negative",
    "handoff_refund",
    "handoff_low_confidence",
    "handoff_offline",
    "handoff_offline_no_schedule",
    "order_not_found",
    "no_orders",
    "order_pending",
    "human_option",
    "apology",
]

_BACK = frozenset({"back_at"})

MESSAGE_VARIABLES: Mapping[str, frozenset[str]] = {
    "welcome": CONTEXT_VARIABLES,
    "away": CONTEXT_VARIABLES | _BACK,
    "away_no_schedule": CONTEXT_VARIABLES,
    "handoff_requested": CONTEXT_VARIABLES,
    "handoff_complaint": CONTEXT_VARIABLES,
    "handoff_negative": CONTEXT_VARIABLES,
    "handoff_refund": CONTEXT_VARIABLES,
    "handoff_low_confidence": CONTEXT_VARIABLES,
    "handoff_offline": CONTEXT_VARIABLES | _BACK,
    "handoff_offline_no_schedule": CONTEXT_VARIABLES,
    "order_not_found": CONTEXT_VARIABLES | {"order_id"},
    "no_orders": CONTEXT_VARIABLES,
    "order_pending": CONTEXT_VARIABLES | ORDER_VARIABLES,
    "human_option": frozenset(),
    "apology": CONTEXT_VARIABLES,
}

DEFAULT_MESSAGES: Mapping[str, Mapping[Language, str]] = {
    "welcome": {
        "zh": "{customer_name}您好，欢迎光临{shop_name}！请问有什么可以帮您？",
        "en": "Hi {customer_name}, welcome to {shop_name}! How can I help you today?",
    },
    "away": {
        "zh": "现在是非工作时间，人工客服将于{back_at}上线。您可以先留言，我们上线后会第一时间回复您。",
        "en": "Our team is offline right now and will be back {back_at}. "
        "Leave a message and we'll reply as soon as we're back.",
    },
    "away_no_schedule": {
        "zh": "人工客服暂时不在线，您可以先留言，我们会尽快回复您。",
        "en": "Our team is offline right now. Leave a message and we'll get back to you soon.",
    },
    "handoff_requested": {
        "zh": "好的，正在为您转接人工客服，请稍候~",
        "en": "Sure, connecting you to a human agent. Please hold on.",
    },
    "handoff_complaint": {
        "zh": "非常抱歉给您带来不好的体验！已为您优先转接人工客服，请稍候。",
        "en": "We're very sorry about your experience. A human agent will be with you "
        "shortly as a priority.",
    },
    "handoff_negative": {
        "zh": "非常抱歉让您不满意！已为您优先转接人工客服，请稍候。",
        "en": "We're sorry we let you down. A human agent will be with you shortly.",
    },
    "handoff_refund": {
        "zh": "收到，已为您转接售后专员处理退款问题，请稍候。",
        "en": "Got it. A refunds specialist will take over shortly.",
    },
    "handoff_low_confidence": {
        "zh": "抱歉，这个问题我暂时回答不了，已为您转接人工客服，请稍候。",
        "en": "Sorry, I'm not sure about that one. A human agent will help you shortly.",
    },
    "handoff_offline": {
        "zh": "已为您登记人工服务。人工客服将于{back_at}上线，届时会优先处理您的问题。",
        "en": "I've passed this to our team. They're back {back_at} and will pick it up first thing.",
    },
    "handoff_offline_no_schedule": {
        "zh": "已为您登记人工服务，人工客服上线后会尽快处理您的问题。",
        "en": "I've passed this to our team; they'll get back to you as soon as they're online.",
    },
    "order_not_found": {
        "zh": "抱歉，没有查到订单{order_id}，请核对订单号后再发给我，或点击下方转人工。",
        "en": "Sorry, I couldn't find order {order_id}. Please check the number, "
        "or tap below to talk to a human.",
    },
    "no_orders": {
        "zh": "抱歉，没有查到您的订单，请把订单号发给我，或点击下方转人工。",
        "en": "I couldn't find an order for your account. Please send me the order number, "
        "or tap below to talk to a human.",
    },
    "order_pending": {
        "zh": "您的订单{order_id}当前状态：{order_status}，暂时还没有物流信息，发货后会第一时间更新哦。",
        "en": "Your order {order_id} is currently {order_status}; there is no tracking "
        "information yet. It will show up as soon as it ships.",
    },
    "human_option": {
        "zh": "转人工",
        "en": "Talk to a human",
    },
    "apology": {
        "zh": "非常抱歉给您带来不好的体验！",
        "en": "We're very sorry about your experience.",
    },
}
"""``human_option`` is the quick-reply label offering a human (the engine treats
the exact label as a handoff request). ``apology`` precedes ``handoff_offline``
for complaints and negative messages outside business hours."""
