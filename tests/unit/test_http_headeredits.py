"""The headers a route sets and removes (request_headers, response_headers)."""

from __future__ import annotations

import pytest

from dcrouter.http.headeredits import (
    REQUEST_UNTOUCHABLE,
    RESPONSE_UNTOUCHABLE,
    HeaderEdits,
    parseHeaderEdits,
)


def test_lines_set_and_remove_headers_whatever_their_case():
    edits = parseHeaderEdits("\n  -authorization\nX-Env:  prod \n\nX-A: a b\t c\n",
                             REQUEST_UNTOUCHABLE)
    assert edits == HeaderEdits(frozenset({b"authorization", b"x-env", b"x-a"}),
                                ((b"X-Env", b"prod"), (b"X-A", b"a b\t c")))
    headers = [(b"Authorization", b"Basic x"), (b"x-env", b"test"), (b"X-ENV", b"dev"),
               (b"Accept", b"*/*")]
    assert edits.apply(headers) == [(b"Accept", b"*/*"), (b"X-Env", b"prod"), (b"X-A", b"a b\t c")]
    assert headers[0] == (b"Authorization", b"Basic x"), "a new list"


@pytest.mark.parametrize(("text", "untouchable", "error"), [
    ("X-Env prod", REQUEST_UNTOUCHABLE, "is not 'Name: value' (to set) or '-Name'"),
    ("X Env: prod", REQUEST_UNTOUCHABLE, "'X Env' is not a header name"),
    ("-", REQUEST_UNTOUCHABLE, "'' is not a header name"),
    ("X-Env:", REQUEST_UNTOUCHABLE, "the value of X-Env must be printable ASCII"),
    ("X-Env: caf\u00e9", REQUEST_UNTOUCHABLE, "the value of X-Env must be printable ASCII"),
    ("Host: a.example", REQUEST_UNTOUCHABLE, "Host cannot be set or removed here"),
    ("-Content-Length", RESPONSE_UNTOUCHABLE, "Content-Length cannot be set or removed"),
    ("Transfer-Encoding: chunked", RESPONSE_UNTOUCHABLE, "cannot be set or removed"),
    ("-Connection", RESPONSE_UNTOUCHABLE, "Connection cannot be set or removed"),
    ("\n \n", REQUEST_UNTOUCHABLE, "no header given"),
])
def test_bad_lines_are_refused(text, untouchable, error):
    with pytest.raises(ValueError) as caught:
        parseHeaderEdits(text, untouchable)
    assert error in str(caught.value)


def test_a_response_may_set_what_a_request_may_not():
    assert parseHeaderEdits("Host: x", RESPONSE_UNTOUCHABLE).added == ((b"Host", b"x"),)
