"""The request limits' JSON check (app.api.limits.json_body_problem) answers the usual body
from pydantic-core's parse and a count of its keys, and anything unusual from json.loads:
the two must agree on every body."""

from typing import Any

import pytest

from app.api import limits

BODIES = [
    b'{"image": "busybox", "command": ["echo", "hi"]}',
    b'{"a": 1, "a": 2}',
    b'{"a": {"b": 1, "b": 2}}',
    b'{"a": [1, {"b": 2, "c": {"b": 3}}]}',
    b'[{"x": 1}, {"x": 2}, {"x": 3, "x": 4}]',
    b'{"a": 1, "\\u0061": 2}',  # the same key, spelled two ways
    b'{"\\"a": 1, "\\"a": 2}',
    b'{"k:": "v:", "w": "::"}',  # colons in strings
    b'{"k": "\\\\", "l": "\\"}:{"}',
    b'[{"x": 1e400}]',
    b'{"x": -1e999}',
    b'{"x": NaN}',
    b'{"x": Infinity}',
    b'{"x": 1.5, "y": -0.0, "z": 1e308}',
    b'{"x": "\\ud800"}',  # a lone surrogate: json.loads takes it, pydantic-core does not
    b'{"x": "\\ud800", "x": 1}',
    b'{"\\ud800": 1, "\\ud800": 2}',
    b'{"a":1}x',
    b'{"a": 1,}',
    b'{"a" 1}',
    b"[1, 2",
    b"",
    b"   ",
    b"null",
    b"123",
    b'"just a string"',
    b'{"\xc3\xa9": "\xf0\x9f\x98\x80", "\xc3\xa9": 1}',
    b'{"a": "\x01"}',  # a control character in a string
    b"\xff\xfe",
    b'{"deep": ' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"n": ' + b"9" * 4000 + b"}",
    b"{}",
    b"[]",
    b'{"": 1, "": 2}',
]


@pytest.mark.parametrize("body", BODIES)
def test_the_quick_check_agrees_with_json_loads(body: bytes, monkeypatch: Any) -> None:
    quick = limits.json_body_problem(body, 32)

    def refuse(*_: Any, **__: Any) -> Any:
        raise ValueError("refused, as pydantic-core refuses what it cannot parse")

    monkeypatch.setattr(limits, "from_json", refuse)
    assert quick == limits.json_body_problem(body, 32)


def test_duplicate_keys_are_found_wherever_they_are() -> None:
    for body in (b'{"a": 1, "a": 2}', b'[{"x": 3, "x": 4}]', b'{"a": 1, "\\u0061": 2}'):
        problem = limits.json_body_problem(body, 32)
        assert problem is not None and "duplicate key" in problem, body
    assert limits.json_body_problem(b'{"a": {"a": 1}, "b": [{"a": 2}]}', 32) is None
