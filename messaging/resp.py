"""A lean pipelined RESP2 client for a broker's two hot commands: the append script (``EVALSHA``, with its meta
hash) and the stream reader's ``XREAD BLOCK`` (docs/adr/0040).

Why not redis-py there: at 5,000 deliveries/s a broker runs one append pipeline and one XREAD per message, and
redis-py's fixed cost per round trip (pool checkout, ``Retry``, a ``Timeout`` context per read, an ``Encoder``
call per argument, the pipeline object, the response callbacks that turn every XREAD entry into a dict) was
the largest Python item of a broker's profile after the ``send`` system calls (docs/benchmarks.md, issue 16).
Here a batch of commands is packed into one ``bytes`` with ``%``-formatting, written with the other batches
of the same loop turn in one ``transport.write`` (one ``send``), and answered through one future, its replies
parsed by hiredis (the C parser redis-py also uses) without callbacks: what redis-py answers with
``decode_responses=False`` minus the XREAD dicts.

What it keeps of redis-py's behaviour: errors are redis-py's classes (``ConnectionError``, ``TimeoutError``,
``ResponseError``, ``NoScriptError``), so callers and their error handling are unchanged; a lost connection
fails every command in flight on it and the next call connects again; a batch unanswered within
``timeout_s`` fails (``TimeoutError``) and drops the connection, like redis-py's socket timeout. Only plain
TCP and Unix-socket servers with an optional ``AUTH``/``SELECT`` (what :func:`resp_client_for` accepts);
anything else (TLS, a cluster) keeps redis-py. One client is one connection, used by one event loop; a
blocking command holds it, so the reader has its own.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio
import redis.asyncio.connection
import redis.exceptions

Arg = bytes | str | int


def command_pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP (an array of bulk strings). ``str`` is UTF-8 (strict, as redis-py's encoder), ``int``
    decimal. Pure."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise redis.exceptions.DataError(f"a command argument must be bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def reply_error(message: str) -> redis.exceptions.ResponseError:
    """The redis-py exception of an error reply (``NOSCRIPT`` gets its own class, as in redis-py)."""
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(message)
    return redis.exceptions.ResponseError(message)


class _Batch:
    __slots__ = ("deadline", "future", "remaining", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, deadline: float) -> None:
        self.future = future
        self.remaining = count
        self.replies: list[Any] = []
        self.deadline = deadline  # loop time by which the server must have answered it


class _Protocol(asyncio.Protocol):
    """The connection: replies are matched to batches in order (RESP answers in order on one connection)."""

    def __init__(self) -> None:
        self.transport: Any = None  # asyncio's or uvloop's transport (uvloop's is no asyncio.Transport subclass)
        self.reader = hiredis.Reader()
        self.batches: collections.deque[_Batch] = collections.deque()
        self.lost = False
        self.failure: Exception | None = None  # why the connection was dropped on purpose (a timeout)
        # Batches packed in this loop turn, written together at its end (:meth:`queue`).
        self.unsent: list[bytes] = []
        # One timer per connection, not one per batch (:meth:`watch`): a ``call_later``, its done-callback and
        # its cancel per round trip were ~2 µs of a broker's work per append and per XREAD (docs/benchmarks.md,
        # issue 16, session 9).
        self.watchdog: asyncio.TimerHandle | None = None
        self.timeout_s = 5.0
        # The loop the connection was made on: ``asyncio.get_running_loop()`` per batch is a ``getpid`` system
        # call each (CPython checks for a fork), and a connection never changes loops.
        self.loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure a timer looks at the oldest batch in flight by its deadline (called for each new batch)."""
        if self.watchdog is None:
            self.watchdog = loop.call_later(self.timeout_s, self._deadline_check, loop)

    def _deadline_check(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batches are answered in order, so only the oldest can be the first past its deadline: drop the
        connection if it is, else look again at its deadline (none in flight: the next batch arms the timer)."""
        self.watchdog = None
        if self.lost or not self.batches:
            return
        late = self.batches[0].deadline - loop.time()
        if late <= 0:
            self.drop(redis.exceptions.TimeoutError(f"no answer from Redis within {self.timeout_s} s"))
        else:
            self.watchdog = loop.call_later(late, self._deadline_check, loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def queue(self, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        """Write ``data`` with every other batch of this loop turn, in one ``write`` once the turn's callbacks
        have run: each write is a ``send`` system call, and in a wave of connects many requests send their
        scripts in the same turn (a gateway's four per connect were ~15 % of its CPU, nearly all in ``send``;
        docs/benchmarks.md, session 8). Order is kept: the batches wait in order, and answer in order."""
        if not self.unsent:
            loop.call_soon(self.flush)
        self.unsent.append(data)

    def flush(self) -> None:
        data, self.unsent = b"".join(self.unsent), []
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        batches = self.batches
        try:
            while (reply := reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    reply = reply_error(str(reply))
                batch = batches[0]
                batch.replies.append(reply)
                batch.remaining -= 1
                if not batch.remaining:
                    batches.popleft()
                    if not batch.future.done():  # a cancelled caller: its replies are read and dropped
                        batch.future.set_result(batch.replies)
        except (hiredis.ProtocolError, IndexError) as exc:  # a reply nobody asked for, or garbage
            self.drop(redis.exceptions.ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        failure = self.failure or redis.exceptions.ConnectionError(
            f"connection to Redis lost{f': {exc}' if exc else ''}")
        while self.batches:
            batch = self.batches.popleft()
            if not batch.future.done():
                batch.future.set_exception(failure)

    def drop(self, failure: Exception) -> None:
        """Fail everything in flight with ``failure`` and close the connection."""
        if self.failure is None:
            self.failure = failure
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    """One pipelined connection to one Redis (see the module docstring). Connects on first use and after a loss."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None, db: int = 0,
                 username: str | None = None, password: str | None = None, timeout_s: float = 5.0,
                 connect_timeout_s: float = 5.0) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            current = self._protocol
            if current is not None and not current.lost:
                return current
            loop = asyncio.get_running_loop()
            try:
                if self.path:
                    connecting = loop.create_unix_connection(_Protocol, self.path)
                else:
                    connecting = loop.create_connection(_Protocol, self.host, self.port)
                _, made = await asyncio.wait_for(connecting, self.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                raise redis.exceptions.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            protocol = made
            protocol.loop = loop
            hello: list[list[Arg]] = []
            if self.password is not None:
                hello.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
            if self.db:
                hello.append(["SELECT", self.db])
            if hello:
                for reply in await self._send(protocol, hello):
                    if isinstance(reply, Exception):
                        protocol.drop(reply)
                        raise reply
            self._protocol = protocol
            return protocol

    def _send(self, protocol: _Protocol, commands: Sequence[Sequence[Arg]]) -> asyncio.Future[list[Any]]:
        loop = protocol.loop or asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        protocol.timeout_s = self.timeout_s
        protocol.batches.append(_Batch(future, len(commands), loop.time() + self.timeout_s))
        assert protocol.transport is not None
        protocol.queue(b"".join([command_pack(c) for c in commands]), loop)
        protocol.watch(loop)
        return future

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order; an error reply is returned as its
        redis-py exception, not raised. Raises ConnectionError / TimeoutError when the connection fails."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        return await self._send(protocol, commands)

    def send_nowait(self, commands: Sequence[Sequence[Arg]]) -> asyncio.Future[list[Any]] | None:
        """:meth:`execute` without a coroutine, when connected: the future of the replies (its exception: the
        connection's failure); None when not connected (use :meth:`execute`, which connects)."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return None
        return self._send(protocol, commands)

    async def call(self, *args: Arg) -> Any:
        """One command; an error reply is raised."""
        reply = (await self.execute([args]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


async def script_run(resp: RespClient | None, script: Any, *, keys: Sequence[Arg], args: Sequence[Any]) -> Any:
    """Run ``script`` (registered with redis-py: ``register_script``) by EVALSHA over ``resp``, and by EVAL once
    on NOSCRIPT (its first use, a restarted or flushed Redis); through redis-py's own call when ``resp`` is
    None. Arguments other than bytes, str and int go as their ``str`` (floats, as redis-py sends them). Raises
    the error reply, or the connection's failure (redis-py's classes)."""
    if resp is None:
        return await script(keys=keys, args=args)
    tail = [len(keys), *keys, *(a if isinstance(a, str | bytes | int) else str(a) for a in args)]
    reply = (await resp.execute([["EVALSHA", script.sha, *tail]]))[0]
    if isinstance(reply, redis.exceptions.NoScriptError):
        reply = (await resp.execute([["EVAL", script.script, *tail]]))[0]
    if isinstance(reply, Exception):
        raise reply
    return reply


def resp_client_for(client: Any, *, timeout_s: float | None = None) -> RespClient | None:
    """A :class:`RespClient` to the same server as the redis-py asyncio ``client`` (same address, db and
    credentials, the same socket timeout unless ``timeout_s``), or None when that server is one this client
    does not speak to (TLS, a cluster, other connection classes): the caller keeps redis-py then."""
    if not isinstance(client, redis.asyncio.Redis):
        return None
    kwargs = client.connection_pool.connection_kwargs
    cls = client.connection_pool.connection_class
    timeout = timeout_s if timeout_s is not None else (kwargs.get("socket_timeout") or 5.0)
    if kwargs.get("credential_provider") is not None or kwargs.get("protocol") not in (None, 2, "2"):
        return None
    if cls is redis.asyncio.connection.Connection:
        host, port, path = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)), None
    elif cls is redis.asyncio.connection.UnixDomainSocketConnection:
        host, port, path = "", 0, str(kwargs["path"])
    else:
        return None
    return RespClient(host=host, port=port, path=path, db=int(kwargs.get("db") or 0), username=kwargs.get("username"),
                      password=kwargs.get("password"), timeout_s=float(timeout),
                      connect_timeout_s=float(kwargs.get("socket_connect_timeout") or 5.0))
