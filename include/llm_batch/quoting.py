"""Quote text that others wrote (a provider's error message, a model's words) in our own texts.

Error messages from an LLM service can be steered by task content. Quoted as they are in a run
note (Markdown, shown in the Airflow UI) or an alert (sent to a chat webhook, rendered as
markup), they could add links, headings or mentions, or make a note say something it does not.
`quote_untrusted` makes such text one capped line that renders as the characters it holds.
"""

from __future__ import annotations

import re

ALERT_QUOTE_CHARS = 200
"""Longest provider text an alert quotes."""

_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")
"""Punctuation that is markup within a line (emphasis, code, links, tables, strike-through):
quoted text is always one line, placed mid-line, so block markup (`#`, `-`, `1.`) is inert."""
_BREAKS = re.compile(r"[\s\x00-\x1f\x7f]+")


def one_line(text: str) -> str:
    """Return `text` with line breaks, tabs and control characters collapsed to single spaces."""
    return _BREAKS.sub(" ", text).strip()


def cap(text: str, limit: int) -> str:
    """Return `text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def escape_html(text: str) -> str:
    """Return `text` with `&`, `<` and `>` as entities.

    That is also all a Slack message needs: links, mentions (`<!channel>`) and formatting
    tokens all start with `<`.
    """
    return "".join(_HTML.get(char, char) for char in text)


def escape_markup(text: str) -> str:
    """Return `text` such that Markdown and HTML show its characters, none of them as markup.

    HTML's special characters become entities (which Markdown renders as the characters);
    Markdown's inline punctuation is backslash-escaped, as CommonMark allows. Meant for text
    placed within a line: see `quote_untrusted`.
    """
    return escape_html(_MARKDOWN.sub(r"\\\1", text))


def quote_untrusted(text: object, limit: int, *, markdown: bool = True) -> str:
    """Return text from outside as one line of at most `limit` characters, markup escaped.

    `markdown=False` escapes HTML only, for texts read as plain text or by a chat service
    (alerts): backslashes would show there, and protect nothing.
    """
    line = cap(one_line(str(text)), limit)
    return escape_markup(line) if markdown else escape_html(line)
