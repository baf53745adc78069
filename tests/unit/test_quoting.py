"""Text from outside is quoted as one capped line that renders as the characters it holds."""

from __future__ import annotations

from llm_batch.quoting import cap, escape_markup, one_line, quote_untrusted


def test_line_breaks_and_control_characters_become_single_spaces() -> None:
    assert one_line("a\n\n b\r\tc\x00d\x1b") == "a b c d"


def test_a_cut_is_marked_and_stays_within_the_limit() -> None:
    assert cap("abcdef", 4) == "abc…" and cap("abc", 4) == "abc"


def test_markdown_and_html_are_escaped_to_show_their_characters() -> None:
    assert escape_markup("*a* _b_ `c` [d](e) <f> & ~~g~~ |") == (
        "\\*a\\* \\_b\\_ \\`c\\` \\[d\\](e) &lt;f&gt; &amp; \\~\\~g\\~\\~ \\|"
    )


def test_plain_quoting_escapes_html_only() -> None:
    assert quote_untrusted("<!here> *x*\nnext", 100, markdown=False) == "&lt;!here&gt; *x* next"


def test_the_cap_applies_before_escaping_so_no_escape_is_cut_in_half() -> None:
    assert quote_untrusted("a" * 9 + "*", 10) == "a" * 9 + "\\*"
    assert quote_untrusted("a" * 10 + "*", 10) == "a" * 9 + "…"
