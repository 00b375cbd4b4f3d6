"""HTML output encoding for the pages `builder` writes (the report): markup comes only from literal templates, and
every value put into one is escaped on the way (OWASP output encoding for HTML text and quoted attribute values).

A page is made of `Html` values: `html(template, **values)` fills a template written in the code, escaping each value
that is not already `Html`; `join` puts parts one after another, escaping those that are not. A string read from a
file (an artifact's name, a model, a metric, a message) therefore cannot become markup by being forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape


class Html(str):
    """Markup. Only `html`, `join` and literal markup (`Html("</p>")`) make one, so every other string (a name, a
    path, a metric, a reason) reaches a page through `html` or `join` and is escaped on the way."""


def html(template: str, /, **values: object) -> Html:
    """`template`, markup written in the code (never built from data), with each `{name}` filled in: Html as it is,
    a number as Python formats it (`{x:.1f}`), anything else escaped for HTML text and quoted attribute values
    (OWASP output encoding: & < > " ' become entities)."""
    return Html(template.format_map({name: _safe(value) for name, value in values.items()}))


def join(parts: Iterable[object], separator: str = "") -> Html:
    """`parts` one after another; a part that is not Html is escaped."""
    return Html(separator.join(str(_safe(part)) for part in parts))


def _safe(value: object) -> object:
    if isinstance(value, Html) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    return escape(str(value), quote=True)
