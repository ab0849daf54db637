"""U+0000, which Postgres's text and jsonb refuse, becomes U+FFFD; nothing else changes."""

from __future__ import annotations

import json

import pytest

from lightloop.store.text import dump_json, storable_json, storable_text


def test_a_nul_in_text_becomes_the_replacement_character() -> None:
    assert storable_text("a\x00b\x00") == "a\ufffdb\ufffd"
    clean = "no nul here"
    assert storable_text(clean) is clean


def test_every_nul_in_a_document_is_replaced_wherever_it_is() -> None:
    doc = {"messages": [{"role": "assistant", "content": "x\x00y"}], "k\x00": ["\x00", 1.5, None]}
    text = dump_json(doc)
    assert "\\u0000" not in text and "\x00" not in text
    assert json.loads(text) == {
        "messages": [{"role": "assistant", "content": "x\ufffdy"}],
        "k\ufffd": ["\ufffd", 1.5, None],
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\\u0000", "\\u0000"),  # a backslash and the letters u0000: text, not a NUL
        ("\\\x00", "\\\ufffd"),  # a backslash, then a NUL
        ("\\\\u0000\x00", "\\\\u0000\ufffd"),
        ("u0000", "u0000"),
    ],
)
def test_escaped_backslashes_are_not_taken_for_a_nul(value: str, expected: str) -> None:
    assert json.loads(dump_json({"v": value})) == {"v": expected}
    assert json.loads(storable_json(json.dumps({"v": value}))) == {"v": expected}


def test_json_text_passed_on_verbatim_is_cleaned_too() -> None:
    assert json.loads(storable_json('{"a": "\\u0000\\u0000z"}')) == {"a": "\ufffd\ufffdz"}
    assert storable_json('{"a": 1}') == '{"a": 1}'
