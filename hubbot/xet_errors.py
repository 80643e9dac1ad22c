"""Failures of hf_xet (the Hub's Xet storage client), told apart as the Hub client's own HTTP errors are.

hf_xet retries inside (5xx, 429, dropped connections) and then raises plain Python exceptions whose
message starts with its error category (read from xet-core's ``XetError`` and checked against the
test Hub): ``ConnectionError`` "Network error: ..." (a dropped or refused connection, or an HTTP 4xx,
e.g. "HTTP status client error (403 Forbidden)"), "Rate limited: ..." (429) and "Server error: ..."
(5xx); ``TimeoutError`` "Timeout: ..."; ``hf_xet.XetAuthenticationError`` (a PermissionError),
``hf_xet.XetObjectNotFoundError`` (a FileNotFoundError), ``RuntimeError`` "Data integrity error: ...",
``ValueError`` "Configuration error: ...".
"""

from __future__ import annotations

import re
from typing import Literal

XetErrorKind = Literal["transient", "permanent", "not-xet"]

# hf_xet's message prefix -> the Python exception it raises with it, and whether a retry may help
_CATEGORIES: dict[str, tuple[type[BaseException], bool]] = {
    "Network error": (ConnectionError, True), "Rate limited": (ConnectionError, True),
    "Server error": (ConnectionError, True), "Timeout": (TimeoutError, True),
    "Authentication error": (PermissionError, False), "Not found": (FileNotFoundError, False),
    "Data integrity error": (RuntimeError, False), "Internal error": (RuntimeError, False),
    "Configuration error": (ValueError, False), "I/O error": (OSError, False),
}
_HTTP_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})[^)]*\)")


def classify_xet_error(error: BaseException) -> XetErrorKind:
    """"transient" when retrying the upload may help (5xx, 429, timeouts, dropped connections),
    "permanent" when it cannot (4xx, refused credentials, corrupt data, bad configuration),
    "not-xet" for anything hf_xet did not raise."""
    category, _, _ = str(error).partition(": ")
    expected = _CATEGORIES.get(category)
    if expected is None or not isinstance(error, expected[0]):
        return "not-xet"
    status = _HTTP_STATUS.search(str(error))
    if category == "Network error" and status and int(status[1]) not in (408, 429):
        return "permanent"  # an HTTP 4xx surfaces as a "network" error
    return "transient" if expected[1] else "permanent"


def describe_xet_error(error: BaseException) -> str:
    """One short line for the user: the HTTP status and the endpoint when hf_xet gave them."""
    text = str(error)
    status, url = _HTTP_STATUS.search(text), re.search(r"domain: (\S+)", text)
    if status and url:
        hint = " (the Hub has no Xet storage here: HF_HUB_DISABLE_XET=1 uploads through LFS)" \
            if status[1] == "404" and "/xet-" in url[1] else ""
        return f"Xet storage answered HTTP {status[1]} on {url[1].split('?')[0]}{hint}"  # no signed query
    return f"Xet storage: {text.splitlines()[0][:200]}"
