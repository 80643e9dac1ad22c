"""The connection to the Hub: every call bounded in time, and one clear line when the Hub cannot be reached.

``huggingface_hub`` sends every request through one shared ``httpx.Client`` (``get_session``) made by a
factory (``set_client_factory``). Its default client has no timeout, and most ``HfApi`` calls pass
``timeout=None``, which httpx reads as "wait forever": a Hub that accepted a commit and never answered
kept a job waiting until the job's own limit. hubbot's client fills in every timeout a call leaves unset
(``HUBBOT_HUB_CONNECT_TIMEOUT``, ``HUBBOT_HUB_TIMEOUT``); calls that set their own (downloads:
``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``) keep theirs. The read/write timeout bounds a
*stall* (no byte for that long), not a whole transfer, so a multi-GB upload that keeps moving never
times out.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from .errors import HubUnreachable, UsageError

CONNECT_TIMEOUT_ENV = "HUBBOT_HUB_CONNECT_TIMEOUT"
TIMEOUT_ENV = "HUBBOT_HUB_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 120.0
TIMEOUTS_HELP = (f"Every Hub call gives up after {CONNECT_TIMEOUT_ENV} seconds without a connection (default "
                 f"{DEFAULT_CONNECT_TIMEOUT:g}) and {TIMEOUT_ENV} seconds without a byte sent or received "
                 f"(default {DEFAULT_TIMEOUT:g}).")
CLOSED_CLIENT = "client has been closed"


@dataclass(frozen=True)
class HubTimeouts:
    connect: float
    stall: float  # the longest wait for the next byte, reading an answer or sending an upload

    @classmethod
    def from_env(cls) -> HubTimeouts:
        return cls(_seconds(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT), _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT))

    def as_dict(self) -> dict[str, float]:
        return {"connect": self.connect, "read": self.stall, "write": self.stall, "pool": self.stall}


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{name}={raw!r}: give a number of seconds above 0")
    return value


class HubClient(httpx.Client):
    """The client ``huggingface_hub`` would make, with hubbot's timeouts in every request."""

    def __init__(self, timeouts: HubTimeouts):
        hook = _hf_request_hook()
        super().__init__(event_hooks={"request": [hook] if hook else []}, follow_redirects=True,
                         timeout=httpx.Timeout(**timeouts.as_dict()))
        self._fallback = timeouts.as_dict()

    def build_request(self, *args, **kwargs) -> httpx.Request:
        request = super().build_request(*args, **kwargs)
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: v if given.get(k) is None else given[k] for k, v in self._fallback.items()}
        return request

    def close(self) -> None:
        # huggingface_hub's retry loop (_http_backoff_base) keeps the client it started with, and closes the
        # shared client after a ConnectError (close_session): its next try then fails with "Cannot send a
        # request, as the client has been closed". Dropping the pooled connections is what that close is
        # for (a fresh TLS session next time); the client itself stays usable.
        self._transport.close()
        for transport in self._mounts.values():
            if transport is not None:
                transport.close()


def _hf_request_hook():
    try:  # offline mode, request ids and HF_DEBUG logging, as huggingface_hub's own client has them
        from huggingface_hub.utils._http import hf_request_event_hook
    except ImportError:
        return None
    return hf_request_event_hook


def install_client() -> None:
    """Make ``huggingface_hub`` use ``HubClient`` with the timeouts configured now (fails on a bad value)."""
    from huggingface_hub import set_client_factory

    timeouts = HubTimeouts.from_env()
    set_client_factory(lambda: HubClient(timeouts))


def fresh_client() -> None:
    """Drop the shared client: the next call builds a new one (new connections, new TLS session)."""
    from huggingface_hub import close_session

    close_session()


# ------------------------------------------------------------------------------------------ failures
def underlying(e: BaseException) -> BaseException:
    """The error behind huggingface_hub's wrappers: LocalEntryNotFoundError (a download that could not
    reach the Hub) and RuntimeError("Error while uploading ...") (an LFS upload) carry the real failure
    as their cause."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    for _ in range(8):
        wrapper = isinstance(e, LocalEntryNotFoundError) or (type(e) is RuntimeError and CLOSED_CLIENT not in str(e))
        if not wrapper or e.__cause__ is None:
            return e
        e = e.__cause__
    return e


def transport_failure(e: BaseException) -> BaseException | None:
    """The connection failure behind ``e`` (an httpx transport error, also wrapped), or None when ``e``
    is something else (an HTTP answer, a bug)."""
    inner = underlying(e)
    if isinstance(inner, httpx.TransportError) or (isinstance(inner, RuntimeError) and CLOSED_CLIENT in str(inner)):
        return inner
    return None


def cause(e: BaseException) -> str:
    """What went wrong with the connection, in a few words (never the request's headers)."""
    timeout = _request_timeouts(e)
    if isinstance(e, httpx.ConnectTimeout):
        return f"no connection within {timeout.get('connect', '?')}s"
    if isinstance(e, httpx.ReadTimeout):
        return f"no answer within {timeout.get('read', '?')}s"
    if isinstance(e, httpx.WriteTimeout):
        return f"sending stalled for {timeout.get('write', '?')}s"
    if isinstance(e, httpx.PoolTimeout):
        return f"no free connection within {timeout.get('pool', '?')}s"
    if isinstance(e, httpx.ConnectError):
        return _connect_cause(e)
    if isinstance(e, httpx.RemoteProtocolError):
        return "the connection dropped before the Hub answered"
    if isinstance(e, (httpx.ReadError, httpx.WriteError, httpx.CloseError)):
        return f"the connection broke ({_first_line(e) or type(e).__name__})"
    if isinstance(e, httpx.ProxyError):
        return f"the proxy failed ({_first_line(e)})"
    if isinstance(e, httpx.UnsupportedProtocol):
        return f"not an http(s) URL ({_first_line(e)})"
    if isinstance(e, RuntimeError):
        return "the connection was closed"
    return f"{type(e).__name__}: {_first_line(e)}"


def _connect_cause(e: BaseException) -> str:
    for inner in _chain(e):
        if isinstance(inner, socket.gaierror):
            return f"cannot resolve its host name ({inner.strerror or inner})"
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({inner.verify_message or inner.reason})"
        if isinstance(inner, ssl.SSLError):
            return f"TLS handshake failed ({inner.reason or _first_line(inner)})"
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused"
        if isinstance(inner, OSError) and inner.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"no route to it ({inner.strerror})"
    text = _first_line(e)
    if "Name or service not known" in text or "nodename nor servname" in text or "resolution" in text:
        return f"cannot resolve its host name ({text})"
    if "SSL" in text or "TLS" in text or "CERTIFICATE" in text:
        return f"TLS handshake failed ({text})"
    if "refused" in text.lower():
        return "connection refused"
    return f"cannot connect ({text or type(e).__name__})"


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    for _ in range(8):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _request_timeouts(e: BaseException) -> dict:
    try:
        return e.request.extensions.get("timeout") or {}  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return {}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


def unreachable(e: BaseException, endpoint: str | None = None, what: str | None = None) -> HubUnreachable:
    """A one-line error for a connection failure: the endpoint, where the request went when that was
    elsewhere (a CDN), and the cause."""
    failure = transport_failure(e) or e
    where = _origin(endpoint) if endpoint else None
    try:
        host = _origin(str(failure.request.url))  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        host = None
    if where is None:
        where = host or "the Hub"
    elif host and host != where:
        where = f"{where} ({host})"
    return HubUnreachable(f"{what + ': ' if what else ''}cannot reach the Hub at {where}: {cause(failure)}")


@contextmanager
def reaching(endpoint: str | None, what: str | None = None) -> Iterator[None]:
    """Turn a connection failure inside the block into ``HubUnreachable`` (one line, exit 1)."""
    try:
        yield
    except Exception as e:
        if transport_failure(e) is None:
            raise
        raise unreachable(e, endpoint, what) from None
