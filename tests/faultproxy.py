"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, in front of a real server (the tests' FakeHub).

Point the client at ``proxy.url``; every request is forwarded to the upstream unchanged unless a
fault matches it. Faults act the way networks and overloaded servers fail, at the socket:

    with FaultProxy(hub.url) as proxy:
        proxy.fault("drop_after", method="POST", path=r"/commit/")   # commit lands, its answer is lost
        proxy.fault("stall", path=r"/preupload/", times=3)           # request read, nothing ever answered
        proxy.refuse()                                               # connections refused from now on

Actions: ``stall`` (read the request, forward nothing, answer nothing until the client gives up),
``drop`` (read the request, close the connection, forward nothing), ``stall_after`` (forward it and
read the upstream's answer, then hold that answer back), ``drop_after`` (forward it, read the answer,
close without sending it), ``forward`` (forward normally: with ``before`` it runs a callable first,
e.g. another client committing at that very moment). ``then_refuse=True`` makes the proxy refuse
every connection once that fault has fired (the Hub "went away" right after).

``requests`` records ``(method, target, what happened)`` for every request the proxy read.
Stdlib only; bodies framed by Content-Length or chunked encoding are forwarded byte for byte.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.hubserver import take_fault

ACTIONS = ("stall", "drop", "stall_after", "drop_after", "forward")


@dataclass
class ProxyFault:
    action: str
    method: str | None
    path: re.Pattern
    times: int
    skip: int
    before: Callable[[], object] | None = None
    then_refuse: bool = False
    seen: int = 0
    fired: int = 0


@dataclass
class _Message:
    head: bytes
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def first_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.host = host
        self.requests: list[tuple[str, str, str]] = []
        self._faults: list[ProxyFault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = port
        self._listen()
        self.url = f"http://{host}:{self.port}"
        self._acceptor: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FaultProxy:
        self._acceptor = threading.Thread(target=self._accept_loop, name="FaultProxy", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.refuse()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults
    def fault(self, action: str, *, method: str | None = None, path: str = ".*", times: int = 1, skip: int = 0,
              before: Callable[[], object] | None = None, then_refuse: bool = False) -> ProxyFault:
        """Apply ``action`` to the next ``times`` requests whose method matches and whose raw target
        (path?query) matches the regex ``path``, after letting ``skip`` of them through."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        f = ProxyFault(action, method and method.upper(), re.compile(path), times, skip, before, then_refuse)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def refuse(self) -> None:
        """Close the listening socket (new connections are refused) and every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            _shutdown(listener)  # stop listening now, not when a blocked accept() returns
            if self._acceptor is not None and self._acceptor is not threading.current_thread():
                self._acceptor.join(timeout=5)
        for conn in conns:
            _shutdown(conn)

    def restore(self) -> None:
        """Listen again on the same port."""
        with self._lock:
            if self._listener is not None:
                return
        self._listen()
        if self._acceptor is None or not self._acceptor.is_alive():
            self.start()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener

    def _take(self, method: str, target: str) -> ProxyFault | None:
        with self._lock:
            return take_fault(self._faults, method, target)

    # -- serving
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by refuse()
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        refuse_after = False
        try:
            reader = client.makefile("rb")
            while not self._stopping.is_set():
                request = _read_message(reader)
                if request is None:
                    return
                method, target = request.first_line.split(" ")[:2]
                fault = self._take(method, target)
                action = fault.action if fault else "forward"
                refuse_after = refuse_after or bool(fault and fault.then_refuse)
                self._record(method, target, action)
                if action in ("stall", "drop"):
                    if action == "stall":
                        self._hold(client)
                    return
                if fault and fault.before:
                    fault.before()
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream_reader = upstream.makefile("rb")
                upstream.sendall(request.head + request.body)
                response = _read_message(upstream_reader, method=method)
                if response is None:
                    return
                if action == "stall_after":
                    self._hold(client)
                    return
                if action == "drop_after":
                    return
                client.sendall(response.head + response.body)
                if request.closes or response.closes:
                    return
        except OSError:
            return
        finally:
            _shutdown(client)
            with self._lock:
                self._conns.discard(client)
            if upstream is not None:
                _shutdown(upstream)
            if refuse_after:
                self.refuse()

    def _record(self, method: str, target: str, action: str) -> None:
        with self._lock:
            self.requests.append((method, target, action))

    def _hold(self, client: socket.socket) -> None:
        """Answer nothing until the client hangs up (or the proxy stops)."""
        client.settimeout(0.1)
        while not self._stopping.is_set():
            try:
                if client.recv(65536) == b"":
                    return
            except TimeoutError:
                continue
            except OSError:
                return


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _read_message(reader, method: str | None = None) -> _Message | None:
    """One HTTP/1.1 request (``method`` None) or response, raw; None at a clean end of stream."""
    line = reader.readline(65537)
    while line in (b"\r\n", b"\n"):  # blank lines between messages
        line = reader.readline(65537)
    if not line:
        return None
    lines = [line]
    while line not in (b"\r\n", b"\n", b""):
        line = reader.readline(65537)
        lines.append(line)
    head = b"".join(lines)
    headers = {}
    for raw in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = raw.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    status = None
    if method is not None:
        status = int(head.split(b" ", 2)[1])
    if method == "HEAD" or (status is not None and (status < 200 or status in (204, 304))):
        return _Message(head, b"", headers)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _Message(head, _read_chunked(reader), headers)
    if "content-length" in headers:
        return _Message(head, reader.read(int(headers["content-length"])), headers)
    if method is None:
        return _Message(head, b"", headers)  # a request without a body
    return _Message(head, reader.read(), headers)  # a response delimited by the connection's end


def _read_chunked(reader) -> bytes:
    out = []
    while True:
        size_line = reader.readline()
        out.append(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = reader.readline()
                out.append(trailer)
                if trailer in (b"\r\n", b"\n", b""):
                    return b"".join(out)
        out.append(reader.read(size + 2))  # the chunk and its CRLF
