"""Answer templates: ``str.format`` syntax restricted to known, plain variables.

Templates are written by shop operators, so they are checked at load time
(unknown variable, positional ``{}``, attribute or index access such as
``{order_id.__class__}``, conversions and format specs are all rejected) and
rendered with :meth:`str.format_map` over plain strings only.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

__all__ = [
    "CONTEXT_VARIABLES",
    "ENTRY_VARIABLES",
    "ORDER_VARIABLES",
    "TemplateError",
    "check_template",
    "render",
    "template_fields",
]

ORDER_VARIABLES: frozenset[str] = frozenset(
    {"order_id", "order_status", "carrier", "tracking_no", "eta", "amount", "items"}
)
"""Filled from the customer's order (see ``engine.OrderInfo``). An answer using any
of them makes the engine look the order up first."""

CONTEXT_VARIABLES: frozenset[str] = frozenset({"customer_name", "shop_name"})
"""Always available."""

ENTRY_VARIABLES: frozenset[str] = ORDER_VARIABLES | CONTEXT_VARIABLES
"""What knowledge-base answers and keyword-rule answers may use."""

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    pass


def template_fields(template: str) -> frozenset[str]:
    """The variable names ``template`` uses; :class:`TemplateError` if it is malformed
    or uses anything but plain ``{name}`` fields."""
    names: set[str] = set()
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"bad template syntax ({exc}); write a literal brace as {{{{ or }}}}"
        ) from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise TemplateError("positional field {} is not allowed: name the variable")
        if not field.isidentifier():
            raise TemplateError(f"field {{{field}}} is not a plain variable name")
        if conversion or spec:
            raise TemplateError(f"field {{{field}}} may not have a conversion or format spec")
        names.add(field)
    return frozenset(names)


def check_template(template: str, allowed: frozenset[str]) -> str | None:
    """A problem description, or ``None`` if ``template`` is fine."""
    try:
        fields = template_fields(template)
    except TemplateError as exc:
        return str(exc)
    unknown = sorted(fields - allowed)
    if unknown:
        names = ", ".join("{" + name + "}" for name in unknown)
        known = ", ".join("{" + name + "}" for name in sorted(allowed))
        return f"unknown variable {names} (known: {known})"
    return None


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a checked template; a variable without a value renders as empty."""
    return template.format_map(_Values(values))


class _Values(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""
