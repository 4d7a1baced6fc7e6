"""The HTTP/1.1 connections of ``mnist-cnn-serve``: uvicorn's h11 protocol with a whole-request
deadline and room for new clients past the connection cap (``DeadlineProtocol``, ``Room``), and
the listening socket (``listen``).
"""

from __future__ import annotations

import socket
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.errors import InputError

REQUEST_SECONDS = 10.0  # a request must have arrived, and been answered, within this of its first byte
KEEP_ALIVE_SECONDS = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 4096  # open at once; past it the connection idle longest is closed
DEADLINE = "mnist_cnn.deadline"  # the scope key of a request's deadline (the event loop's clock)


class Room:
    """Room for new clients: the connections waiting for a request (none begun), in the order they
    began to wait. When the open connections pass ``cap``, those that have waited longest are
    closed -- first those that never sent a byte -- never a connection working on a request.

    Closing is paced: ``BATCH`` connections every ``GRACE`` seconds (1,000 a second). A client
    that reconnects whenever it is closed turns every close into a new connection in the listen
    queue; closing thousands at once kept that queue full, and a new client's predict took a
    median of 1.2 s (TCP's one-second SYN retry, by the look of it). The pause also lets a client that has just
    connected send its request before it could be taken for idle. Past twice the cap, a new
    connection is closed at once (the file descriptors' bound)."""

    GRACE = 0.05  # seconds between two rounds of closing
    BATCH = 50  # connections closed in one round

    def __init__(self, cap: int):
        self.cap = cap
        self.idle: OrderedDict = OrderedDict()  # DeadlineProtocol -> None
        self._pending = None

    def waiting(self, connection) -> None:
        self.idle[connection] = None
        self.idle.move_to_end(connection)

    def working(self, connection) -> None:
        self.idle.pop(connection, None)

    def check(self, connections: set, loop) -> None:
        if len(connections) > self.cap and self._pending is None:
            self._pending = loop.call_later(self.GRACE, self._make_room, connections, loop)

    def _make_room(self, connections: set, loop) -> None:
        self._pending = None
        excess = min(len(connections) - self.cap, self.BATCH)
        if excess <= 0:
            return
        silent = [c for c in self.idle if not c.heard][:excess]
        heard = [c for c in self.idle if c.heard][:excess - len(silent)] if len(silent) < excess else []
        for connection in silent + heard:
            connection.close_idle()
        self.check(connections, loop)


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a whole-request deadline and room for new clients
    (``Room``, as ``Config.room``).

    Deadline: from the moment a connection waits for a request, its headers and body must have
    arrived within ``request_seconds`` (``Config.request_seconds``), however slowly the bytes
    trickle in, or the connection is closed; the request's scope carries its deadline to
    answer by (``request_seconds`` from its first byte)."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self._deadline = None
        self._first_byte = None
        self._arm()
        room = self.config.room
        if len(self.connections) > 2 * room.cap:
            self.close_idle()
        else:
            room.check(self.connections, self.loop)

    @property
    def heard(self) -> bool:
        """Whether the connection has sent a byte of the request it is waiting for."""
        return self._first_byte is not None

    def data_received(self, data: bytes) -> None:
        if self._first_byte is None:
            self._first_byte = self.loop.time()
        super().data_received(data)

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:  # a request began
            started = self._first_byte if self._first_byte is not None else self.loop.time()
            self.cycle.scope[DEADLINE] = started + self._seconds()
            self.config.room.working(self)

    def on_response_complete(self):
        self._first_byte = None
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        self.config.room.working(self)
        super().connection_lost(exc)

    def _seconds(self) -> float:
        return getattr(self.config, "request_seconds", REQUEST_SECONDS)

    def _arm(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self._seconds(), self._expire)
        self.config.room.waiting(self)

    def close_idle(self):
        self.config.room.working(self)
        self.connections.discard(self)  # uvicorn's connection_lost does it too, once the socket has closed
        if not self.transport.is_closing():
            self.transport.close()

    def _expire(self):
        cycle = self.cycle
        waiting = cycle is None or cycle.response_complete or cycle.more_body  # headers or body still due
        if waiting and not self.transport.is_closing():
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()


def connection_settings(config, request_seconds: float, max_connections: int = MAX_CONNECTIONS) -> None:
    """What ``DeadlineProtocol`` reads from uvicorn's ``Config``."""
    config.request_seconds = request_seconds
    config.room = Room(max_connections)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (IPv4 or IPv6) and ``port`` (0: any free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError, UnicodeError) as e:
        raise InputError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
