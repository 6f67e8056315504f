"""Tests for ``tests.faultproxy.FaultProxy`` against real PostgreSQL and MariaDB.

These tests talk to the servers directly through the drivers (no Django, no
``django_db`` fixtures). Tests that need a server are marked ``requires_server``
(deselected on SQLite runs, per tests/conftest.py) and never skip: the proxy is
the foundation of the reliability tests, so a server that is down must fail
loudly. Note they need *both* PostgreSQL and MariaDB, whatever ``DB_BACKEND`` is.
The remaining tests use a local echo server and need no database.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import MySQLdb  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
import psycopg
import pytest

from tests.faultproxy import FaultProxy, HeldBytes, wait_for_hangup

HOST = "127.0.0.1"
PG_PORT = 5432
MY_PORT = 3306

# How long a stalled operation must stay blocked to count as "not completed".
STALL_PROBE = 0.3
# Upper bound for anything that should happen "promptly" (server-side cleanup,
# a resumed query finishing, a refused connect failing).
DEADLINE = 5.0

PgConn = psycopg.Connection[tuple[Any, ...]]


def _proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("faultproxy-")]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    # Autouse fixtures are set up first and torn down last, i.e. after the proxy
    # fixtures below have stopped their proxies.
    assert _proxy_threads() == []
    yield
    assert _proxy_threads() == []


@pytest.fixture
def pg_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(HOST, PG_PORT) as proxy:
        yield proxy


@pytest.fixture
def my_proxy() -> Iterator[FaultProxy]:
    with FaultProxy(HOST, MY_PORT) as proxy:
        yield proxy


def pg_connect(port: int, **kwargs: Any) -> PgConn:
    return psycopg.connect(
        host=HOST,
        port=port,
        user="postgres",
        dbname="test",
        connect_timeout=5,
        autocommit=True,
        **kwargs,
    )


def my_connect(port: int, **kwargs: Any) -> Any:
    conn = MySQLdb.connect(
        host=HOST, port=port, user="root", passwd="", db="test", connect_timeout=5, **kwargs
    )
    conn.autocommit(True)
    return conn


def my_query(conn: Any, sql: str, args: tuple[Any, ...] | None = None) -> Any:
    cur = conn.cursor()
    try:
        cur.execute(sql, args)
        return cur.fetchone()
    finally:
        cur.close()


def pg_query(conn: PgConn, sql: str, args: tuple[Any, ...] | None = None) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Background:
    """Run ``fn`` in a thread; record its result or exception; signal ``done``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-background", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def join(self) -> Any:
        assert self.done.wait(DEADLINE), "background call did not complete"
        self.thread.join(DEADLINE)
        if self.error is not None:
            raise self.error
        return self.result


# -- PostgreSQL ----------------------------------------------------------------


def pg_session_exists(direct: PgConn, pid: int) -> bool:
    return bool(pg_query(direct, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)))


@pytest.mark.requires_server
def test_pg_query_through_proxy(pg_proxy: FaultProxy) -> None:
    with pg_connect(pg_proxy.port) as conn:
        assert pg_query(conn, "SELECT 1 + 1") == 2
        assert pg_proxy.active_connections == 1
        assert pg_proxy.total_connections == 1
        # The server sees the proxy as the peer, not us.
        assert pg_query(conn, "SELECT inet_client_port()") != pg_proxy.port
    pg_proxy.wait_for_active(0)
    assert pg_proxy.refused_connections == 0


@pytest.mark.requires_server
def test_pg_drop_all(pg_proxy: FaultProxy) -> None:
    app_name = f"faultproxy-{uuid.uuid4().hex[:12]}"
    with (
        pg_connect(PG_PORT) as direct,
        pg_connect(pg_proxy.port, application_name=app_name) as conn,
    ):
        pid = pg_query(conn, "SELECT pg_backend_pid()")
        # Prove the proxied session is visible server-side before dropping it.
        assert (
            pg_query(
                direct, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            )
            == pid
        )

        assert pg_proxy.drop_all() == 1
        assert pg_proxy.active_connections == 0

        # The RST is sent; wait until this client's kernel has processed all of
        # it. Otherwise psycopg's poll() can run while the kernel is half way
        # through and see an error without the socket being readable; psycopg
        # then raises without telling libpq, and ``conn.broken`` stays false
        # (see ``wait_for_hangup``). Seen under load on a clean-clone CI run.
        wait_for_hangup(conn.pgconn.socket)
        with pytest.raises(psycopg.OperationalError) as excinfo:
            conn.execute("SELECT 1")
        assert "closed" in str(excinfo.value) or "reset" in str(excinfo.value)
        assert conn.broken
        wait_until(lambda: not pg_session_exists(direct, pid), f"backend {pid} to exit")

        # The proxy keeps accepting: a new connection works.
        with pg_connect(pg_proxy.port) as conn2:
            assert pg_query(conn2, "SELECT 1") == 1
            assert pg_proxy.active_connections == 1
    assert pg_proxy.total_connections == 2


@pytest.mark.requires_server
def test_pg_refuse_new_and_accept_new(pg_proxy: FaultProxy) -> None:
    with pg_connect(pg_proxy.port) as existing:
        pg_proxy.refuse_new()
        with pytest.raises(psycopg.OperationalError) as refused:
            pg_connect(pg_proxy.port)
        # Failed because the proxy refused it, not after connect_timeout.
        assert not isinstance(refused.value, psycopg.errors.ConnectionTimeout)
        assert pg_proxy.refused_connections >= 1
        assert pg_proxy.total_connections == 1
        # Existing connections are unaffected.
        assert pg_query(existing, "SELECT 1") == 1

        pg_proxy.accept_new()
        with pg_connect(pg_proxy.port) as conn:
            assert pg_query(conn, "SELECT 1") == 1
    assert pg_proxy.total_connections == 2


@pytest.mark.requires_server
def test_pg_stall_and_resume(pg_proxy: FaultProxy) -> None:
    with pg_connect(pg_proxy.port) as conn:
        pg_proxy.stall()
        try:
            job = Background(lambda: pg_query(conn, "SELECT 42"))
            # The query was sent and is held: only then does "not completed" mean
            # the stall held it (and not that the thread had yet to send it).
            pg_proxy.wait_for_held(from_client=1)
            assert not job.done.wait(STALL_PROBE), "query completed through a stalled proxy"
        finally:
            pg_proxy.resume()
        assert job.join() == 42
        assert pg_query(conn, "SELECT 1") == 1


@pytest.mark.requires_server
def test_pg_stall_holds_new_connections(pg_proxy: FaultProxy) -> None:
    pg_proxy.stall()
    try:
        job = Background(lambda: pg_connect(pg_proxy.port))
        # The TCP connection is accepted and forwarded, but no bytes move: the
        # driver's first message is held.
        pg_proxy.wait_for_active(1)
        pg_proxy.wait_for_held(from_client=1)
        assert not job.done.wait(STALL_PROBE), "connect completed through a stalled proxy"
    finally:
        pg_proxy.resume()
    with job.join() as conn:
        assert pg_query(conn, "SELECT 1") == 1


@pytest.mark.requires_server
def test_pg_drop_all_while_stalled(pg_proxy: FaultProxy) -> None:
    direct = pg_connect(PG_PORT)
    # Not ``with pg_connect(...) as conn``: its exit COMMITs, see the end.
    conn = pg_connect(pg_proxy.port)
    try:
        pid = pg_query(conn, "SELECT pg_backend_pid()")
        pg_proxy.stall()
        job = Background(lambda: conn.execute("SELECT 1"))
        # The query was sent and is held by the proxy, so the drop below hits a
        # query in flight (a loaded machine may otherwise not have run the
        # thread yet, and the test would only show that a dead connection fails).
        pg_proxy.wait_for_held(from_client=1)
        assert not job.done.wait(STALL_PROBE), "query completed through a stalled proxy"
        # Dropping does not wait for resume(): the blocked query fails at once...
        assert pg_proxy.drop_all() == 1
        with pytest.raises(psycopg.OperationalError):
            job.join()
        # ... and the server's session really ends.
        wait_until(lambda: not pg_session_exists(direct, pid), f"backend {pid} to exit")
    finally:
        # The race this test used to lose under load (issue #9): the job thread
        # is inside psycopg's poll() when the RST arrives, and psycopg 3.3 polls
        # again every 0.1 s. A poll() that runs while the kernel is half way
        # through the reset sees POLLERR/POLLHUP without POLLIN, and psycopg
        # (checked on 3.3.9) raises OperationalError("connection socket closed")
        # without telling libpq, which keeps the connection OK with the query
        # "in progress" (see ``wait_for_hangup``). The failure asserted above is
        # the same either way, but then a COMMIT (the exit of ``with conn:``)
        # fails with "another command is already in progress". Nothing outside
        # psycopg can keep its poll() from overlapping the reset, so the test
        # closes the connection, which is safe in both states, and commits nothing.
        conn.close()
        direct.close()
        pg_proxy.resume()


# -- MariaDB -------------------------------------------------------------------


def my_session_exists(direct: Any, conn_id: int) -> bool:
    row = my_query(
        direct, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (conn_id,)
    )
    return bool(row[0])


@pytest.mark.requires_server
def test_my_query_through_proxy(my_proxy: FaultProxy) -> None:
    conn = my_connect(my_proxy.port)
    try:
        assert my_query(conn, "SELECT 1 + 1") == (2,)
        assert my_proxy.active_connections == 1
        assert my_proxy.total_connections == 1
    finally:
        conn.close()
    my_proxy.wait_for_active(0)


@pytest.mark.requires_server
def test_my_drop_all(my_proxy: FaultProxy) -> None:
    direct = my_connect(MY_PORT)
    conn = my_connect(my_proxy.port)
    try:
        (conn_id,) = my_query(conn, "SELECT CONNECTION_ID()")
        # Prove the proxied session is visible server-side before dropping it.
        assert my_session_exists(direct, conn_id)

        assert my_proxy.drop_all() == 1
        assert my_proxy.active_connections == 0

        with pytest.raises(MySQLdb.OperationalError) as excinfo:
            my_query(conn, "SELECT 1")
        # Connector/C says (2006, 'Server has gone away'); 2013 "Lost connection to
        # server during query" is the other way a reset can surface.
        assert excinfo.value.args[0] in (2006, 2013)
        wait_until(lambda: not my_session_exists(direct, conn_id), f"thread {conn_id} to exit")

        conn2 = my_connect(my_proxy.port)
        try:
            assert my_query(conn2, "SELECT 1") == (1,)
        finally:
            conn2.close()
    finally:
        conn.close()
        direct.close()
    assert my_proxy.total_connections == 2


@pytest.mark.requires_server
def test_my_refuse_new_and_accept_new(my_proxy: FaultProxy) -> None:
    existing = my_connect(my_proxy.port)
    try:
        my_proxy.refuse_new()
        with pytest.raises(MySQLdb.OperationalError) as excinfo:
            my_connect(my_proxy.port)
        # MariaDB Connector/C reports the RST during connect as 2002 "Can't connect to
        # server on '127.0.0.1' (115)"; 2013 "Lost connection ... at 'handshake: reading
        # initial communication packet'" would be equally valid — but not with
        # "system error: 110" (ETIMEDOUT), which is connect_timeout, not the refusal.
        assert excinfo.value.args[0] in (2002, 2013)
        assert "system error: 110" not in excinfo.value.args[1]
        assert my_proxy.refused_connections == 1
        assert my_query(existing, "SELECT 1") == (1,)

        my_proxy.accept_new()
        conn = my_connect(my_proxy.port)
        try:
            assert my_query(conn, "SELECT 1") == (1,)
        finally:
            conn.close()
    finally:
        existing.close()
    assert my_proxy.total_connections == 2


@pytest.mark.requires_server
def test_my_stall_and_resume(my_proxy: FaultProxy) -> None:
    conn = my_connect(my_proxy.port)
    try:
        my_proxy.stall()
        try:
            job = Background(lambda: my_query(conn, "SELECT 42"))
            my_proxy.wait_for_held(from_client=1)  # sent, and held
            assert not job.done.wait(STALL_PROBE), "query completed through a stalled proxy"
        finally:
            my_proxy.resume()
        assert job.join() == (42,)
    finally:
        conn.close()


@pytest.mark.requires_server
def test_my_drop_all_while_stalled(my_proxy: FaultProxy) -> None:
    direct = my_connect(MY_PORT)
    conn = my_connect(my_proxy.port)
    try:
        (conn_id,) = my_query(conn, "SELECT CONNECTION_ID()")
        my_proxy.stall()
        job = Background(lambda: my_query(conn, "SELECT 1"))
        my_proxy.wait_for_held(from_client=1)  # the drop hits a query in flight
        assert not job.done.wait(STALL_PROBE), "query completed through a stalled proxy"
        assert my_proxy.drop_all() == 1
        with pytest.raises(MySQLdb.OperationalError) as excinfo:
            job.join()
        # Connector/C is blocked reading the reply: 2013 "Lost connection to
        # server during query".
        assert excinfo.value.args[0] == 2013
        wait_until(lambda: not my_session_exists(direct, conn_id), f"thread {conn_id} to exit")
    finally:
        conn.close()
        direct.close()
        my_proxy.resume()


@pytest.mark.requires_server
def test_my_stall_trips_client_read_timeout(my_proxy: FaultProxy) -> None:
    conn = my_connect(my_proxy.port, read_timeout=1)
    try:
        my_proxy.stall()
        start = time.monotonic()
        with pytest.raises(MySQLdb.OperationalError) as excinfo:
            my_query(conn, "SELECT 1")
        elapsed = time.monotonic() - start
        assert excinfo.value.args[0] == 2013
        # Not before read_timeout (time only moves forward: no race). libmysqlclient
        # retries reads, so the effective timeout is a multiple of read_timeout; the
        # query's end is bounded by the error itself, not by a wall-clock guess.
        assert elapsed > 0.9
    finally:
        conn.close()
        my_proxy.resume()


# -- proxy mechanics (no database needed) --------------------------------------


class EchoServer:
    """A one-connection-at-a-time echo server on 127.0.0.1, for byte-level tests."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="test-echo", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        data = sock.recv(n - len(chunks))
        if not data:
            raise EOFError(f"EOF after {len(chunks)} of {n} bytes")
        chunks += data
    return bytes(chunks)


def test_stall_holds_data_without_losing_it(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, larger than every buffer involved
    with (
        FaultProxy(HOST, echo.port) as proxy,
        socket.create_connection((HOST, proxy.port), timeout=DEADLINE) as sock,
    ):
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"

        proxy.stall()
        sender = Background(lambda: sock.sendall(payload))
        sock.settimeout(STALL_PROBE)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        proxy.resume()

        sock.settimeout(DEADLINE)
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()


def test_held_bytes_counts_what_a_stall_holds_in_each_direction() -> None:
    with (
        socket.create_server((HOST, 0)) as listener,
        FaultProxy(HOST, listener.getsockname()[1]) as proxy,
        socket.create_connection((HOST, proxy.port), timeout=DEADLINE) as client,
    ):
        listener.settimeout(DEADLINE)
        server, _ = listener.accept()  # the proxy connects upstream on admission
        with server:
            server.settimeout(DEADLINE)
            client.sendall(b"hi")
            assert recv_exactly(server, 2) == b"hi"
            assert proxy.held_bytes() == HeldBytes(0, 0)

            proxy.stall()
            server.sendall(b"s" * 700)
            assert proxy.wait_for_held(from_upstream=700) == HeldBytes(0, 700)
            client.sendall(b"c" * 300)
            assert proxy.wait_for_held(from_client=300) == HeldBytes(300, 700)

            proxy.resume()
            assert recv_exactly(client, 700) == b"s" * 700
            assert recv_exactly(server, 300) == b"c" * 300
            assert proxy.held_bytes() == HeldBytes(0, 0)
            assert proxy.drop_all() == 1
            assert proxy.held_bytes() == HeldBytes(0, 0)


def test_wait_for_held_rejects_bad_arguments_and_times_out(echo: EchoServer) -> None:
    with (
        FaultProxy(HOST, echo.port) as proxy,
        socket.create_connection((HOST, proxy.port), timeout=DEADLINE),
    ):
        proxy.wait_for_active(1)
        with pytest.raises(ValueError, match=r"from_client=0, from_upstream=0"):
            proxy.wait_for_held()
        with pytest.raises(ValueError, match=r"from_client=-1, from_upstream=1"):
            proxy.wait_for_held(from_client=-1, from_upstream=1)
        proxy.stall()
        with pytest.raises(
            TimeoutError,
            match=r"from_client>=1, from_upstream>=0 byte\(s\) within 0.1s, hold HeldBytes",
        ):
            proxy.wait_for_held(from_client=1, timeout=0.1)


def test_wait_for_hangup_returns_once_the_reset_is_processed(echo: EchoServer) -> None:
    with (
        FaultProxy(HOST, echo.port) as proxy,
        socket.create_connection((HOST, proxy.port), timeout=DEADLINE) as sock,
    ):
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        with pytest.raises(TimeoutError, match=r"no RST or FIN processed within 0\.1s"):
            wait_for_hangup(sock.fileno(), timeout=0.1)

        assert proxy.drop_all() == 1
        wait_for_hangup(sock.fileno())
        # All of the reset is in: poll() reports it readable, with the error,
        # without waiting.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        [(_, events)] = poller.poll(0)
        assert events & select.POLLIN
        assert events & select.POLLERR
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_wait_for_hangup_rejects_a_closed_descriptor() -> None:
    sock = socket.socket()
    fd = sock.fileno()
    sock.close()
    with pytest.raises(ValueError, match=rf"{fd} is not an open file descriptor"):
        wait_for_hangup(fd, timeout=DEADLINE)


def test_graceful_close_propagates(echo: EchoServer) -> None:
    with FaultProxy(HOST, echo.port) as proxy:
        with socket.create_connection((HOST, proxy.port), timeout=DEADLINE) as sock:
            sock.sendall(b"bye")
            sock.shutdown(socket.SHUT_WR)
            # Half-close is forwarded after the data; the echo server then closes.
            assert recv_exactly(sock, 3) == b"bye"
            assert sock.recv(1) == b""
        proxy.wait_for_active(0)


def test_drop_all_resets_client(echo: EchoServer) -> None:
    with (
        FaultProxy(HOST, echo.port) as proxy,
        socket.create_connection((HOST, proxy.port), timeout=DEADLINE) as sock,
    ):
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        assert proxy.drop_all() == 1
        # RST, not FIN: the client sees a reset, not a clean EOF.
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert proxy.drop_all() == 0


def connect_and_recv(port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=DEADLINE) as sock:
        return sock.recv(1)


def test_upstream_down_resets_client() -> None:
    # A bound but non-listening socket: connecting to its port is refused, and
    # holding the port prevents a TCP self-connect from an ephemeral source port.
    with socket.socket() as placeholder:
        placeholder.bind((HOST, 0))
        dead_port = placeholder.getsockname()[1]
        with FaultProxy(HOST, dead_port) as proxy:
            # The RST can race the client's connect(): it surfaces either from
            # connect() itself or from the first recv().
            with pytest.raises(ConnectionResetError):
                connect_and_recv(proxy.port)
            assert proxy.upstream_failures == 1
            assert proxy.total_connections == 0
            assert proxy.active_connections == 0


def test_wait_for_active_times_out_with_clear_message(echo: EchoServer) -> None:
    with FaultProxy(HOST, echo.port) as proxy:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"expected 1 active connection\(s\) within 0.2s"):
            proxy.wait_for_active(1, timeout=0.2)
        # It waited its timeout (time only moves forward: no race); that it returned
        # at all is the bound.
        assert time.monotonic() - start >= 0.2


def test_stop_leaves_no_threads_and_resets_clients(echo: EchoServer) -> None:
    proxy = FaultProxy(HOST, echo.port).start()
    socks = [socket.create_connection((HOST, proxy.port), timeout=DEADLINE) for _ in range(3)]
    try:
        proxy.wait_for_active(3)
        proxy.stall()  # stop() must not depend on resume()
        assert len(_proxy_threads()) == 4  # accept thread + one per connection
        proxy.stop()
        assert _proxy_threads() == []
        assert proxy.active_connections == 0
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        proxy.stop()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, proxy.port), timeout=DEADLINE).close()
    finally:
        for sock in socks:
            sock.close()
        proxy.stop()


@pytest.mark.requires_server
def test_stop_with_live_db_connections(pg_proxy: FaultProxy, my_proxy: FaultProxy) -> None:
    pg = pg_connect(pg_proxy.port)
    my = my_connect(my_proxy.port)
    try:
        assert pg_query(pg, "SELECT 1") == 1
        assert my_query(my, "SELECT 1") == (1,)
        pg_proxy.stop()
        my_proxy.stop()
        assert _proxy_threads() == []
        with pytest.raises(psycopg.OperationalError):
            pg.execute("SELECT 1")
        with pytest.raises(MySQLdb.OperationalError):
            my_query(my, "SELECT 1")
    finally:
        pg.close()
        my.close()
