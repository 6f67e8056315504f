"""A small, deterministic TCP fault-injection proxy for reliability tests.

``FaultProxy`` sits between a database driver and a real database server on
127.0.0.1 and lets a test break the network on demand::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        conn = psycopg.connect(host="127.0.0.1", port=proxy.port, ...)
        proxy.drop_all()        # the server "dies": RST on both sides
        proxy.refuse_new()      # the server refuses new connections
        proxy.stall()           # the network hangs: no bytes move
        proxy.resume()

Design notes (the *why*):

* Stdlib only, threads + ``selectors``, no asyncio: the proxy must work the same
  from sync tests, async tests and tests that start their own event loops, and
  it must never depend on (or block) the loop of the code under test.
* One daemon thread accepts connections, and every proxied connection gets one
  daemon thread that multiplexes both sockets with a selector. All threads are
  named ``faultproxy-...`` so tests can assert that none outlive ``stop()``.
* Every fault operation is *synchronous*: when ``drop_all()``, ``stall()`` or
  ``stop()`` returns, the fault is fully in effect *in the proxy*. Tests can
  therefore assert on the proxy right after the call, without sleeps or
  retries. What a client observes comes through its own kernel, which is not
  the proxy's to control: see ``held_bytes()``/``wait_for_held()`` (a stalled
  request really is held) and ``wait_for_hangup()`` (a client socket has
  really processed the reset).
* Only the thread that owns a connection ever acts on its sockets. Closing a
  socket from another thread while it is inside ``select()`` is racy (the file
  descriptor number can be reused under the selector's feet), so fault
  operations ask the owner thread to act, wake it through a socketpair, and
  wait for it. The one exception only reads: ``held_bytes()`` asks the kernel
  how much is queued on a socket, under the lock the owner closes it under.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import select
import selectors
import socket
import struct
import termios
import threading
import time
from types import TracebackType
from typing import Final, NamedTuple

__all__ = ["FaultProxy", "HeldBytes", "wait_for_hangup"]

_RECV_SIZE: Final = 64 * 1024
# Per-direction userspace buffer. When full we stop reading from the sender so
# that TCP flow control (not our memory) absorbs a slow or stalled receiver.
_BUFFER_LIMIT: Final = 256 * 1024
_JOIN_TIMEOUT: Final = 5.0
_UPSTREAM_CONNECT_TIMEOUT: Final = 5.0
# SO_LINGER with l_onoff=1, l_linger=0: close() discards unsent data and sends
# an RST instead of the FIN handshake.
_LINGER_RST: Final = struct.pack("ii", 1, 0)

_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE
# Interval of the bounded polling in wait_for_held(): the bytes it waits for
# arrive in a kernel buffer that nothing in the proxy is notified about.
_POLL_INTERVAL: Final = 0.005


class HeldBytes(NamedTuple):
    """Bytes the proxy has received (or can receive) and not yet forwarded.

    ``from_client`` is on its way to the upstream server, ``from_upstream`` to
    the client. Both count the proxy's own buffer plus what waits unread in the
    kernel's receive buffer of the socket it reads from.
    """

    from_client: int
    from_upstream: int


def wait_for_hangup(fd: int, timeout: float = 10.0) -> None:
    """Block until the socket ``fd`` has fully processed its peer's RST or FIN.

    ``FaultProxy.drop_all()`` returns once the proxy has sent its RSTs, but the
    client's kernel processes an RST on its own time (on loopback usually at
    once; under load its softirq work can be deferred to ``ksoftirqd``). While
    it does, a concurrent ``poll()`` can see the reset half done: Linux's
    ``tcp_done_with_error()`` sets ``sk_err`` before ``tcp_done()`` sets
    ``sk_shutdown``, and ``tcp_poll()`` reads both without the socket lock, so
    it can report ``POLLERR``/``POLLHUP`` *without* ``POLLIN`` (checked on
    Linux 6.18). psycopg 3.3's wait functions (checked on 3.3.9) then raise
    ``OperationalError("connection socket closed")`` without asking libpq,
    which still believes the connection is fine with a query in progress:
    ``broken`` stays false and the next command (such as the ``COMMIT`` of
    ``with conn:``) fails with "another command is already in progress".
    Waiting here first means the client meets the reset only once it is
    complete, when ``poll()`` reports it readable and libpq reads the error
    itself. (A client already blocked in a query when the RST arrives cannot be
    protected this way: see ``test_pg_drop_all_while_stalled``.)

    ``POLLRDHUP`` is the observable end state: only a shut-down read side sets
    it, which ``tcp_done()`` (or a FIN) does. Raises ``TimeoutError`` if it
    does not happen within ``timeout`` seconds.
    """
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"socket {fd}: no RST or FIN processed within {timeout}s")
        # A half-processed reset can wake this with POLLERR alone; poll again
        # then (the rest of the reset is microseconds behind).
        for _, events in poller.poll(remaining * 1000):
            if events & select.POLLNVAL:
                raise ValueError(f"wait_for_hangup(): {fd} is not an open file descriptor")
            if events & select.POLLRDHUP:
                return


def _abort_socket(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST rather than a graceful FIN.

    Why RST: a graceful close looks like an orderly shutdown that drivers and
    servers handle on a happy path (clean EOF, sometimes only noticed lazily).
    An RST makes the failure immediate and loud on *both* ends, the way a
    crashed server, a killed connection (``pg_terminate_backend`` aside) or a
    failover behind a load balancer looks: the server's backend sees
    ``ECONNRESET`` at once and ends the session, and the client's next send or
    receive fails with "connection reset"/EOF.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _tune(sock: socket.socket) -> None:
    """Make ``sock`` non-blocking and disable Nagle.

    Database protocols are chatty with small messages; Nagle's algorithm
    combined with delayed ACKs would add ~40 ms stalls per round trip through
    the proxy, which would slow tests down and blur timing assertions.
    """
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_interest(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Register, modify or unregister ``sock`` so that it waits for ``events``."""
    try:
        key: selectors.SelectorKey | None = sel.get_key(sock)
    except KeyError:
        key = None
    if events == 0:
        if key is not None:
            sel.unregister(sock)
    elif key is None:
        sel.register(sock, events)
    elif key.events != events:
        sel.modify(sock, events)


def _recv(sock: socket.socket) -> bytes | None:
    """Non-blocking receive: ``None`` if nothing is available, ``b""`` on EOF."""
    try:
        return sock.recv(_RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s kernel receive buffer (FIONREAD)."""
    answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", answer)[0])


def _send(sock: socket.socket, data: bytearray) -> int:
    """Non-blocking send: the number of bytes the kernel accepted (maybe 0)."""
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


class _Waker:
    """A socketpair used to interrupt a thread blocked in ``select()``."""

    def __init__(self) -> None:
        self.rsock, self._wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            # A full buffer means a wake-up is already pending; that is enough.
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._wsock.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.rsock.recv(4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.rsock.close()
            self._wsock.close()


class _Connection:
    """One proxied client <-> upstream pair, forwarded by its own thread.

    ``io_lock`` is held whenever the thread moves bytes (or forwards an EOF).
    ``FaultProxy.stall()`` sets its flag and then acquires and releases every
    ``io_lock`` once: any forwarding that was in progress has finished by then,
    and the thread re-reads the flag under ``io_lock`` before moving anything
    else. That is what makes ``stall()`` take effect exactly when it returns.

    ``io_lock`` also guards the buffers and the sockets' lifetime: the thread
    closes its sockets under it (after clearing ``sockets_open``), so ``held()``
    can query them from another thread without meeting a closed, or reused,
    file descriptor.
    """

    def __init__(
        self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket, name: str
    ) -> None:
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self._waker = _Waker()
        self.io_lock = threading.Lock()
        # Guarded by io_lock.
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.sockets_open = True
        # Guarded by proxy._lock.
        self.abort_requested = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def wake(self) -> None:
        self._waker.wake()

    def _flags(self) -> tuple[bool, bool]:
        """Return ``(abort_requested, stalled)``, read consistently under the lock."""
        with self._proxy._lock:
            return self.abort_requested, self._proxy._stalled

    def held(self) -> HeldBytes:
        """What this connection holds back, in each direction (see ``HeldBytes``)."""
        with self.io_lock:
            if not self.sockets_open:
                return HeldBytes(0, 0)
            return HeldBytes(
                len(self.to_upstream) + _unread(self._client),
                len(self.to_client) + _unread(self._upstream),
            )

    def _run(self) -> None:
        client, upstream = self._client, self._upstream
        # Modified in place only, under io_lock, so held() sees them whole.
        to_upstream, to_client = self.to_upstream, self.to_client
        client_eof = upstream_eof = False  # we have read EOF from that peer
        client_shut = upstream_shut = False  # we have sent EOF to that peer
        graceful = False
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._waker.rsock, _READ)
            while True:
                abort, stalled = self._flags()
                if abort:
                    break
                # While stalled we only listen to the waker: unread data stays in
                # the kernel buffers (held, not lost) and TCP flow control pushes
                # back on the senders exactly like a hung network path would.
                want_client = want_upstream = 0
                if not stalled:
                    if not client_eof and len(to_upstream) < _BUFFER_LIMIT:
                        want_client |= _READ
                    if to_client and not client_shut:
                        want_client |= _WRITE
                    if not upstream_eof and len(to_client) < _BUFFER_LIMIT:
                        want_upstream |= _READ
                    if to_upstream and not upstream_shut:
                        want_upstream |= _WRITE
                _set_interest(sel, client, want_client)
                _set_interest(sel, upstream, want_upstream)

                ready: dict[object, int] = {}
                for key, mask in sel.select():
                    if key.fileobj is self._waker.rsock:
                        self._waker.drain()
                    else:
                        ready[key.fileobj] = mask

                with self.io_lock:
                    abort, stalled = self._flags()
                    if abort:
                        break
                    if stalled:
                        continue
                    if ready.get(client, 0) & _READ:
                        data = _recv(client)
                        if data == b"":
                            client_eof = True
                        elif data is not None:
                            to_upstream += data
                    if ready.get(upstream, 0) & _READ:
                        data = _recv(upstream)
                        if data == b"":
                            upstream_eof = True
                        elif data is not None:
                            to_client += data
                    # Write opportunistically: a socket is almost always writable,
                    # and waiting for another select() round would add latency.
                    if to_upstream and not upstream_shut:
                        del to_upstream[: _send(upstream, to_upstream)]
                    if to_client and not client_shut:
                        del to_client[: _send(client, to_client)]
                    # Propagate half-closes once everything before them is delivered.
                    if client_eof and not to_upstream and not upstream_shut:
                        upstream.shutdown(socket.SHUT_WR)
                        upstream_shut = True
                    if upstream_eof and not to_client and not client_shut:
                        client.shutdown(socket.SHUT_WR)
                        client_shut = True
                    if client_shut and upstream_shut:
                        graceful = True
                        break
        except OSError:
            # A peer reset us (ECONNRESET/EPIPE...): pass the reset on to the
            # other side so it fails as abruptly as the original did.
            graceful = False
        finally:
            sel.close()
            with self.io_lock:
                self.sockets_open = False
                if graceful:
                    client.close()
                    upstream.close()
                else:
                    _abort_socket(client)
                    _abort_socket(upstream)
            self._waker.close()
            self._proxy._forget(self)


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` with on-demand faults.

    Use it as a context manager (``with FaultProxy(...) as proxy``) or call
    ``start()``/``stop()``. Point the driver at ``listen_host:proxy.port``.

    Counters: ``total_connections`` counts client connections that were
    forwarded (an upstream connection was made), ``refused_connections`` the
    ones reset because of ``refuse_new()``, and ``upstream_failures`` the ones
    reset because the upstream server could not be reached.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Held by the accept thread while it admits a connection, so that
        # drop_all() also catches a connection that is halfway through admission.
        self._admit_lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._names = itertools.count(1)
        self._stalled = False
        self._refusing = False
        self._stopping = False
        self._total = 0
        self._refused = 0
        self._upstream_failures = 0
        self._port: int | None = None
        self._waker: _Waker | None = None
        self._accept_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.listen_host}:{self._port} -> "
            f"{self.upstream_host}:{self.upstream_port} active={self.active_connections}>"
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind an ephemeral port on ``listen_host`` and start accepting."""
        with self._lock:
            if self._accept_thread is not None:
                raise RuntimeError("FaultProxy.start() called twice")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.listen_host, 0))
                listener.listen(128)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self._port = int(listener.getsockname()[1])
            self._waker = _Waker()
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._waker),
                name=f"faultproxy-accept-{self._port}",
                daemon=True,
            )
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and reset every connection; wait for all threads.

        Idempotent. Raises ``RuntimeError`` if a thread fails to exit within a
        few seconds (that would be a proxy bug, and silently leaking threads
        into later tests would hide it).
        """
        with self._lock:
            thread, waker = self._accept_thread, self._waker
            if thread is None or waker is None or self._stopping:
                return
            self._stopping = True
        waker.wake()
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{thread.name} did not exit within {_JOIN_TIMEOUT}s")
        waker.close()
        # The accept thread is gone, so no connection can be added any more.
        with self._lock:
            connections = list(self._connections)
        self._abort(connections)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------

    def drop_all(self) -> int:
        """Reset every proxied connection, on both sides; return how many.

        When this returns, the client-side and the upstream socket of every
        connection that existed are closed with an RST (see ``_abort_socket``):
        the server sees its session's socket reset, and the client's next use
        of its connection fails. New connections are still accepted afterwards.

        The RSTs are sent, not necessarily processed by the receiving kernels
        yet. A test that asserts on how a client reacts to the reset should
        first wait for its socket to have processed it: ``wait_for_hangup()``.
        """
        with self._admit_lock:
            with self._lock:
                connections = list(self._connections)
            self._abort(connections)
        return len(connections)

    def refuse_new(self) -> None:
        """Reset new client connections as soon as they are accepted.

        This simulates a server that is down or refusing connections. The TCP
        handshake itself succeeds (the kernel completes it before ``accept()``),
        then the client immediately receives an RST, so the driver's connect
        fails fast rather than hanging. Existing connections keep working.
        Applies to every connection accepted after this call returns.
        """
        with self._lock:
            self._refusing = True

    def accept_new(self) -> None:
        """Undo ``refuse_new()``."""
        with self._lock:
            self._refusing = False

    def stall(self) -> None:
        """Stop moving bytes, in both directions, on all connections.

        Applies to existing connections and to new ones (which are still
        accepted and connected upstream, but see no bytes). Data is held, not
        lost: it stays in kernel and proxy buffers until ``resume()``. When this
        returns, no further byte will be forwarded. This models a hung network
        path or a frozen server, which only client-side timeouts can detect.
        """
        with self._lock:
            self._stalled = True
            connections = list(self._connections)
        for conn in connections:
            conn.wake()
            # Wait out any forwarding step that is in progress.
            with conn.io_lock:
                pass

    def resume(self) -> None:
        """Undo ``stall()``: forward everything that was held, then carry on."""
        with self._lock:
            self._stalled = False
            connections = list(self._connections)
        for conn in connections:
            conn.wake()

    # -- introspection -------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (only valid after ``start()``)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def active_connections(self) -> int:
        """Client connections currently being proxied."""
        with self._lock:
            return len(self._connections)

    @property
    def total_connections(self) -> int:
        """Client connections ever forwarded upstream (refused ones excluded)."""
        with self._lock:
            return self._total

    @property
    def refused_connections(self) -> int:
        """Client connections reset because of ``refuse_new()``."""
        with self._lock:
            return self._refused

    @property
    def upstream_failures(self) -> int:
        """Client connections reset because the upstream could not be reached."""
        with self._lock:
            return self._upstream_failures

    def held_bytes(self) -> HeldBytes:
        """Bytes held back by the proxy, summed over its connections.

        Meaningful while stalled (otherwise they are moving): after ``stall()``
        whatever a peer sends stays in the proxy, and this counts it.
        """
        with self._lock:
            connections = list(self._connections)
        held = [conn.held() for conn in connections]
        return HeldBytes(sum(h.from_client for h in held), sum(h.from_upstream for h in held))

    def wait_for_held(
        self, *, from_client: int = 0, from_upstream: int = 0, timeout: float = 10.0
    ) -> HeldBytes:
        """Block until the proxy holds at least these many bytes; return ``held_bytes()``.

        Use it after ``stall()`` to know that a request (or a reply) really was
        sent and is now held by the proxy, rather than not sent yet: only then
        does "it did not complete" prove anything, and only then does a fault
        injected next hit a request in flight. Raises ``TimeoutError`` after
        ``timeout`` seconds.
        """
        if from_client < 0 or from_upstream < 0 or from_client + from_upstream == 0:
            raise ValueError(
                "wait_for_held() needs from_client and/or from_upstream > 0 (and neither "
                f"negative), got from_client={from_client}, from_upstream={from_upstream}"
            )
        # Bounded polling: the bytes land in a kernel buffer that a stalled
        # connection thread deliberately does not watch.
        deadline = time.monotonic() + timeout
        while True:
            held = self.held_bytes()
            if held.from_client >= from_client and held.from_upstream >= from_upstream:
                return held
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"FaultProxy: expected to hold from_client>={from_client}, "
                    f"from_upstream>={from_upstream} byte(s) within {timeout}s, hold {held}"
                )
            time.sleep(_POLL_INTERVAL)

    def wait_for_active(self, n: int, timeout: float = 10.0) -> None:
        """Block until exactly ``n`` connections are active, or raise TimeoutError.

        Useful after closing a client connection: the proxy notices the close
        asynchronously, so ``active_connections`` drops shortly after.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._connections) == n, timeout):
                raise TimeoutError(
                    f"FaultProxy: expected {n} active connection(s) within {timeout}s, "
                    f"have {len(self._connections)} (total={self._total}, "
                    f"refused={self._refused}, upstream_failures={self._upstream_failures})"
                )

    # -- internals -----------------------------------------------------------

    def _abort(self, connections: list[_Connection]) -> None:
        """Ask each connection's thread to reset both sockets, and wait for it."""
        with self._lock:
            for conn in connections:
                conn.abort_requested = True
        for conn in connections:
            conn.wake()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        stuck = []
        for conn in connections:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
            if conn.thread.is_alive():
                stuck.append(conn.thread.name)
        if stuck:
            raise RuntimeError(f"FaultProxy threads did not exit: {stuck}")

    def _forget(self, conn: _Connection) -> None:
        with self._cond:
            self._connections.discard(conn)
            self._cond.notify_all()

    def _is_stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def _accept_loop(self, listener: socket.socket, waker: _Waker) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(listener, _READ)
            sel.register(waker.rsock, _READ)
            while not self._is_stopping():
                for key, _ in sel.select():
                    if key.fileobj is waker.rsock:
                        waker.drain()
                while not self._is_stopping():
                    try:
                        client, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionAbortedError:
                        continue
                    self._admit(client)
        finally:
            sel.close()
            listener.close()

    def _admit(self, client: socket.socket) -> None:
        with self._admit_lock:
            with self._cond:
                refuse = self._refusing
                if refuse:
                    # Count before resetting, so the count is already visible
                    # when the client observes the failure.
                    self._refused += 1
                    self._cond.notify_all()
            if refuse:
                _abort_socket(client)
                return
            try:
                upstream = socket.create_connection(
                    (self.upstream_host, self.upstream_port), timeout=_UPSTREAM_CONNECT_TIMEOUT
                )
            except OSError:
                with self._cond:
                    self._upstream_failures += 1
                    self._cond.notify_all()
                _abort_socket(client)
                return
            _tune(client)
            _tune(upstream)
            conn = _Connection(
                self, client, upstream, f"faultproxy-conn-{self._port}-{next(self._names)}"
            )
            with self._cond:
                self._connections.add(conn)
                self._total += 1
                self._cond.notify_all()
            conn.thread.start()
