"""Connection management shared by :class:`Device` and :class:`Pilot`.

One background task owns the connection: it connects, authenticates, runs a session (a reader
and a JSON-ping heartbeat) until the link ends, then waits an exponential backoff with jitter
and connects again, forever, unless the relay refuses the credential (:class:`AuthError`) or
``close()`` is called.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Self, Union

import websockets.client
import websockets.exceptions

from .errors import AuthError, CommandError, NotConnectedError, TetherError

log = logging.getLogger("tether_client")

JSON = dict[str, Any]
MessageHandler = Callable[[JSON], Union[None, Awaitable[None]]]

#: Error codes (in an ``error`` message or a close reason) that mean the credential itself was
#: refused: retrying cannot help.
AUTH_REFUSALS = frozenset({"auth_failed", "revoked", "forbidden", "not_authenticated", "invalid_handshake_key"})

#: Close code some relays use for "unauthorized"; treated like a refused credential.
CLOSE_UNAUTHORIZED = 4401
CLOSE_POLICY = 1008

#: Answers that do not end a request: the relay's acknowledgement of delivery or queueing, and
#: output chunks of a running command (protocol.md 12.1).
_INTERIM_ACKS = frozenset({"delivered", "queued"})

_MAX_INCOMING = 16 * 1024 * 1024
_DISPATCH_QUEUE = 1024


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(msg: Any) -> str:
    """Compact JSON. Sensor values are often NaN (e.g. no fix), which JSON cannot carry and the
    relay would refuse as ``malformed_json``: they are sent as null."""
    try:
        return json.dumps(msg, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(msg), separators=(",", ":"), allow_nan=False)


def now_ms() -> float:
    """Wall clock in ms since the Unix epoch (the unit of every timestamp in the protocol)."""
    return time.time() * 1000.0


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass
class _Pending:
    future: "asyncio.Future[JSON]"
    on_progress: Optional[MessageHandler] = None


class _LinkEnded(Exception):
    """Why a session ended (not fatal: the client reconnects)."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _closed_reason(exc: websockets.exceptions.ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    return 1006, ""


class _Client:
    """Base class: connection loop, requests by correlationID, handlers. Not used directly."""

    _role = "client"

    def __init__(
        self,
        *,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        open_timeout: float = 10.0,
    ) -> None:
        """Connection settings (all in seconds).

        Args:
            ping_interval: how often to send a JSON ``ping`` to check the link.
            ping_timeout: how long to wait for its ``pong`` before declaring the link dead and
                reconnecting.
            backoff_initial: first reconnection delay; it doubles per failed attempt.
            backoff_max: cap of the reconnection delay (30 s).
            stable_after: a connection that lasted this long resets the backoff.
            open_timeout: limit for the WebSocket handshake plus ``auth_ok``.
        """
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.open_timeout = open_timeout

        #: Our id as the relay knows it (from ``auth_ok``); None before the first connection.
        self.client_id: Optional[str] = None
        #: The last ``auth_ok`` payload (``clientID``, ``role``, ``org``, ``relayTime``, ...).
        self.auth_info: Optional[JSON] = None
        #: Round trip of the last heartbeat ping, ms.
        self.rtt_ms: Optional[float] = None
        #: Connection attempts so far (successful or not).
        self.attempts = 0
        #: Successful authentications so far (1 after start, +1 per reconnection).
        self.connect_count = 0

        self._ws: Optional[websockets.client.WebSocketClientProtocol] = None
        self._pending: dict[str, _Pending] = {}
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._connect_handlers: list[Callable[[JSON], Any]] = []
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._closing = False
        self._fatal: Optional[BaseException] = None
        self._run_task: Optional[asyncio.Task[None]] = None
        self._dispatch_task: Optional[asyncio.Task[None]] = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected: Optional[asyncio.Event] = None
        self._stopped: Optional[asyncio.Event] = None
        self._queue: Optional[asyncio.Queue[tuple[Callable[..., Any], tuple[Any, ...]]]] = None
        self._dropped_dispatch = 0
        self._last_error_code: Optional[str] = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True while an authenticated connection is open."""
        return self._ws is not None and self._connected is not None and self._connected.is_set()

    async def start(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Start the background connection.

        Args:
            wait: wait until the first connection is authenticated. With ``False`` the client
                connects in the background (use :meth:`wait_connected`).
            timeout: with ``wait``, give up after this many seconds (``TimeoutError``); None
                waits as long as it takes (the client retries with backoff meanwhile).

        Raises:
            AuthError: the relay refused the credential (no retry is attempted).
        """
        if self._run_task is not None:
            return
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._queue = asyncio.Queue(maxsize=_DISPATCH_QUEUE)
        self._dispatch_task = asyncio.create_task(self._dispatch_loop(), name=f"tether-{self._role}-dispatch")
        self._run_task = asyncio.create_task(self._run(), name=f"tether-{self._role}-link")
        if wait:
            try:
                await self.wait_connected(timeout)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Close the connection (code 1000) and stop reconnecting. Pending requests fail."""
        self._closing = True
        me = asyncio.current_task()  # close() may be called from a handler: do not cancel it
        tasks = [t for t in (self._run_task, self._dispatch_task, *self._tasks) if t is not None and t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._fail_pending(self._fatal or NotConnectedError("the client was closed"))
        if self._stopped is not None:
            self._stopped.set()

    async def wait_connected(self, timeout: Optional[float] = None) -> None:
        """Wait until an authenticated connection is open.

        Raises:
            AuthError: the credential was refused (now or earlier).
            NotConnectedError: the client was closed or not started.
            TimeoutError: ``timeout`` passed.
        """
        if self._connected is None or self._stopped is None:
            raise NotConnectedError("start() the client first")
        if self._fatal is not None:
            raise self._fatal
        if self._connected.is_set():
            return
        waiters = {asyncio.ensure_future(self._connected.wait()), asyncio.ensure_future(self._stopped.wait())}
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not done:
            raise TimeoutError(f"no connection to the relay within {timeout} s")
        if not self._connected.is_set():
            raise NotConnectedError("the client was closed")

    async def wait_closed(self) -> None:
        """Run until the client stops: after ``close()``, or raise the :class:`AuthError` that
        stopped it. Handy as the last line of a node: ``await device.wait_closed()``."""
        if self._stopped is None:
            raise NotConnectedError("start() the client first")
        await self._stopped.wait()
        if self._fatal is not None:
            raise self._fatal

    # ------------------------------------------------------------------ handlers

    def on_message(self, msg_type: str, handler: Optional[MessageHandler] = None) -> Any:
        """Call ``handler(message)`` (sync or async; the whole envelope) for every message of
        ``msg_type`` that nothing else consumed (answers to :meth:`request` go to the request).
        Use ``"*"`` for every such message. Works as a decorator when ``handler`` is omitted."""

        def register(fn: MessageHandler) -> MessageHandler:
            self._handlers.setdefault(msg_type, []).append(fn)
            return fn

        return register(handler) if handler is not None else register

    def on_connect(self, handler: Callable[[JSON], Any]) -> Callable[[JSON], Any]:
        """Call ``handler(auth_ok_payload)`` (sync or async) after every authentication, the
        first one and each reconnection. Usable as a decorator."""
        self._connect_handlers.append(handler)
        return handler

    # ------------------------------------------------------------------ sending

    def new_correlation_id(self, prefix: str = "py") -> str:
        """A correlationID unique to this client."""
        return f"{prefix}-{self._id_prefix}-{next(self._ids)}"

    async def send(
        self,
        msg_type: str,
        payload: Optional[JSON] = None,
        client_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
    ) -> None:
        """Send one message (fire and forget).

        Args:
            msg_type: the ``type``.
            payload: the ``payload`` object (``{}`` if None).
            client_id: the target (``clientID``) of a routed message.
            correlation_id: copied by the relay and the device into their answers.

        Raises:
            NotConnectedError: no connection right now (the client may be reconnecting).
            AuthError: the client stopped because the credential was refused.
        """
        msg: JSON = {"type": msg_type, "payload": payload if payload is not None else {}}
        if correlation_id is not None:
            msg["correlationID"] = correlation_id
        if client_id is not None:
            msg["clientID"] = client_id
        await self._send_json(msg)

    async def _send_json(self, msg: JSON) -> None:
        if self._fatal is not None:
            raise self._fatal
        ws = self._ws
        if ws is None:
            raise NotConnectedError()
        try:
            await ws.send(encode(msg))
        except websockets.exceptions.ConnectionClosed as e:
            raise NotConnectedError(f"the connection closed while sending ({e})") from e

    async def request(
        self,
        msg_type: str,
        payload: Optional[JSON] = None,
        client_id: Optional[str] = None,
        timeout: float = 30.0,
        *,
        correlation_id: Optional[str] = None,
        check: bool = False,
        on_progress: Optional[MessageHandler] = None,
    ) -> JSON:
        """Send a message with a correlationID and return its final answer (the whole envelope).

        The final answer is the first message with that correlationID that is neither an
        ``ack`` ``delivered``/``queued`` nor a ``command_progress`` (those go to
        ``on_progress``): the device's ``command_output``/``command_result``/
        ``speed_test_result``, an ``ack`` ``ok`` (leases), ``subscribed``, ``pong``, ... Waits for
        a connection first if the client is reconnecting (within ``timeout``); an answer that
        arrives on a later connection still counts.

        Args:
            msg_type: the request type, e.g. ``execute_command``.
            payload: its payload.
            client_id: the target device, for routed requests.
            timeout: seconds for the whole exchange.
            correlation_id: use this id instead of a generated one.
            check: raise :class:`CommandError` when the answer is a ``command_result`` with
                ``ok:false``.
            on_progress: called with each interim message (``ack``, ``command_progress``).

        Raises:
            TetherError: the relay answered ``error`` (``code`` as in protocol.md 7.1).
            CommandError: with ``check``, the device reported failure.
            TimeoutError: no final answer within ``timeout``.
            AuthError: the credential was refused meanwhile.
        """
        cid = correlation_id or self.new_correlation_id(msg_type.split("_")[0])
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), on_progress)
        self._pending[cid] = pending
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.wait_connected()
                    try:
                        await self.send(msg_type, payload, client_id, cid)
                        break
                    except NotConnectedError:
                        await asyncio.sleep(0.05)
                answer = await pending.future
        except TimeoutError:
            raise TimeoutError(f"no answer to {msg_type} {cid} within {timeout} s") from None
        finally:
            self._pending.pop(cid, None)
        if check and answer.get("type") == "command_result":
            p = answer.get("payload") or {}
            if not p.get("ok", False):
                raise CommandError(str(p.get("code") or "command_failed"), str(p.get("error") or ""), p.get("data"), cid)
        return answer

    async def ping(self, timeout: float = 10.0) -> float:
        """Send a JSON ``ping`` and return the round trip in ms."""
        t0 = time.monotonic()
        await self.request("ping", {"t": now_ms()}, timeout=timeout)
        return (time.monotonic() - t0) * 1000.0

    # ------------------------------------------------------------------ subclass hooks

    async def _prepare(self) -> tuple[str, dict[str, str]]:
        """The WebSocket URL and extra headers for the next connection attempt."""
        raise NotImplementedError

    def _consume(self, msg: JSON, received_ms: float) -> bool:
        """Handle a role-specific message; True if it was consumed."""
        return False

    def _on_authenticated(self) -> None:
        """Called after each ``auth_ok`` (the reader is about to run)."""

    # ------------------------------------------------------------------ internals

    def _spawn(self, coro: Awaitable[Any], name: str) -> "asyncio.Task[Any]":
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self._role, task.get_name(), exc_info=task.exception())

    def _dispatch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a user handler call; handlers run one at a time, in arrival order, off the
        reader (a slow handler delays other handlers, never heartbeats or answers)."""
        assert self._queue is not None
        try:
            self._queue.put_nowait((fn, args))
        except asyncio.QueueFull:
            self._dropped_dispatch += 1
            if self._dropped_dispatch in (1, 10, 100) or self._dropped_dispatch % 1000 == 0:
                log.warning("%s: handlers are too slow; %d message(s) dropped", self._role, self._dropped_dispatch)

    async def _dispatch_loop(self) -> None:
        assert self._queue is not None
        while not self._closing:
            fn, args = await self._queue.get()
            try:
                await _maybe_await(fn(*args))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: handler %r failed", self._role, getattr(fn, "__name__", fn))

    def _dispatch_generic(self, msg: JSON) -> None:
        handlers = self._handlers.get(str(msg.get("type")), []) + self._handlers.get("*", [])
        for h in handlers:
            self._dispatch(h, msg)

    def _fail_pending(self, exc: BaseException) -> None:
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: a random delay in [d/2, d], d = initial * 2^attempt,
        capped at ``backoff_max``."""
        d = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return d / 2 + random.uniform(0, d / 2)

    async def _run(self) -> None:
        assert self._connected is not None and self._stopped is not None
        attempt = 0
        try:
            while not self._closing:
                hint = 0.0
                self.attempts += 1
                try:
                    ws, auth_ok = await self._open()
                except AuthError as e:
                    self._fatal = e
                    log.error("%s: the relay refused the credential: %s", self._role, e)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # relay down, refused connection, timeout, rate limit...
                    if isinstance(e, TetherError) and e.retry_after_ms:
                        hint = e.retry_after_ms / 1000.0
                    elif isinstance(e, _LinkEnded):
                        hint = e.retry_after
                    log.info("%s: cannot connect (%s: %s)", self._role, type(e).__name__, e)
                else:
                    started = time.monotonic()
                    self._ws = ws
                    self.auth_info = auth_ok
                    self.client_id = str(auth_ok.get("clientID", self.client_id))
                    self.connect_count += 1
                    self._last_error_code = None
                    self._connected.set()
                    log.info("%s: connected as %s (connection %d)", self._role, self.client_id, self.connect_count)
                    self._on_authenticated()
                    for h in self._connect_handlers:
                        self._dispatch(h, auth_ok)
                    try:
                        ended = await self._session(ws)
                    except AuthError as e:
                        self._fatal = e
                        log.error("%s: the relay withdrew the credential: %s", self._role, e)
                        break
                    finally:
                        self._connected.clear()
                        self._ws = None
                    if self._closing:
                        break
                    hint = ended.retry_after
                    log.warning("%s: connection lost: %s", self._role, ended)
                    if time.monotonic() - started >= self.stable_after:
                        attempt = 0
                delay = max(self._backoff(attempt), hint)
                attempt += 1
                log.info("%s: reconnecting in %.1f s (attempt %d)", self._role, delay, attempt)
                await asyncio.sleep(delay)
        finally:
            self._connected.clear()
            self._ws = None
            if self._fatal is not None:
                self._fail_pending(self._fatal)
            self._stopped.set()

    async def _open(self) -> tuple[websockets.client.WebSocketClientProtocol, JSON]:
        """Connect and authenticate; return the socket and the ``auth_ok`` payload."""
        url, headers = await self._prepare()
        ws = await websockets.client.connect(
            url,
            extra_headers=headers,
            compression=None,  # the relay negotiates no extension
            ping_interval=None,  # our own JSON heartbeat; the relay's WebSocket pings are answered anyway
            open_timeout=self.open_timeout,
            close_timeout=2,
            max_size=_MAX_INCOMING,
        )
        try:
            try:
                raw = await asyncio.wait_for(ws.recv(), self.open_timeout)
            except websockets.exceptions.ConnectionClosed as e:
                raise self._close_error(e, authenticated=False) from None
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise TetherError("malformed_json", "the relay's first message is not a JSON object")
            payload = msg.get("payload") or {}
            if msg.get("type") == "auth_ok":
                return ws, payload
            if msg.get("type") == "error":
                code = str(payload.get("code", "error"))
                err_cls = AuthError if code in AUTH_REFUSALS else TetherError
                raise err_cls(code, str(payload.get("message", "")), payload)
            raise TetherError("unexpected", f"expected auth_ok, got {msg.get('type')!r}")
        except BaseException:
            await self._close_ws(ws)
            raise

    def _close_error(self, exc: websockets.exceptions.ConnectionClosed, authenticated: bool) -> Exception:
        """Map a close to AuthError (credential refused) or _LinkEnded (reconnect)."""
        code, reason = _closed_reason(exc)
        reason_code = reason.split(":")[0].strip()
        if code == CLOSE_UNAUTHORIZED or reason_code in AUTH_REFUSALS:
            return AuthError(reason_code or "auth_failed", f"connection closed with {code} {reason!r}")
        if code == CLOSE_POLICY and not authenticated and reason_code not in ("rate_limited", "slow_consumer"):
            return AuthError(reason_code or "auth_failed", f"connection closed with {code} {reason!r}")
        if self._last_error_code in ("auth_failed", "revoked") and code in (CLOSE_POLICY, 1006):
            return AuthError(self._last_error_code, f"connection closed with {code} {reason!r}")
        retry = 0.0
        if reason_code == "rate_limited":
            retry = 1.0
        return _LinkEnded(f"closed with {code} {reason!r}".rstrip(), retry)

    async def _close_ws(self, ws: websockets.client.WebSocketClientProtocol) -> None:
        try:
            await asyncio.wait_for(ws.close(), 3)
        except asyncio.CancelledError:
            if ws.transport is not None:
                ws.transport.abort()
            raise
        except Exception:
            if ws.transport is not None:
                ws.transport.abort()

    async def _session(self, ws: websockets.client.WebSocketClientProtocol) -> _LinkEnded:
        """Run reader and heartbeat until one ends; return why (or raise AuthError)."""
        reader = asyncio.create_task(self._read_loop(ws), name=f"tether-{self._role}-reader")
        pinger = asyncio.create_task(self._ping_loop(ws), name=f"tether-{self._role}-heartbeat")
        done: set[asyncio.Task[None]] = set()
        try:
            done, _ = await asyncio.wait({reader, pinger}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Not connected from here on: sends fail fast instead of queueing on a dying link.
            self._ws = None
            if self._connected is not None:
                self._connected.clear()
            for t in (reader, pinger):
                t.cancel()
            await asyncio.gather(reader, pinger, return_exceptions=True)
            if pinger in done and ws.transport is not None:
                ws.transport.abort()  # dead link: no close handshake to wait for
            else:
                await self._close_ws(ws)
        task = done.pop()
        exc = task.exception() if not task.cancelled() else None
        if isinstance(exc, AuthError):
            raise exc
        if isinstance(exc, _LinkEnded):
            return exc
        if exc is not None:
            return _LinkEnded(f"{type(exc).__name__}: {exc}")
        return _LinkEnded("the link ended")

    async def _ping_loop(self, ws: websockets.client.WebSocketClientProtocol) -> None:
        """JSON ``ping`` every ``ping_interval``; no ``pong`` within ``ping_timeout``: the link
        is dead (a half-open TCP connection would otherwise go unnoticed for minutes)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            cid = self.new_correlation_id("hb")
            pending = _Pending(loop.create_future())
            self._pending[cid] = pending
            t0 = time.monotonic()
            try:
                await ws.send(encode({"type": "ping", "correlationID": cid, "payload": {"t": now_ms()}}))
                await asyncio.wait_for(pending.future, self.ping_timeout)
            except TimeoutError:
                raise _LinkEnded(f"no pong within {self.ping_timeout} s: the link is dead") from None
            except websockets.exceptions.ConnectionClosed:
                return  # the reader reports why
            finally:
                self._pending.pop(cid, None)
            self.rtt_ms = (time.monotonic() - t0) * 1000.0

    async def _read_loop(self, ws: websockets.client.WebSocketClientProtocol) -> None:
        while True:
            try:
                raw = await ws.recv()
            except websockets.exceptions.ConnectionClosed as e:
                raise self._close_error(e, authenticated=True) from None
            received_ms = now_ms()
            if isinstance(raw, bytes):
                log.warning("%s: ignoring a binary frame", self._role)
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                log.warning("%s: ignoring a message that is not JSON: %.200s", self._role, raw)
                continue
            if not isinstance(msg, dict):
                continue
            self._route(msg, received_ms)

    def _route(self, msg: JSON, received_ms: float) -> None:
        msg_type = msg.get("type")
        cid = msg.get("correlationID")
        pending = self._pending.get(cid) if isinstance(cid, str) else None
        if pending is not None and not pending.future.done():
            payload = msg.get("payload") or {}
            if (msg_type == "ack" and payload.get("status") in _INTERIM_ACKS) or msg_type == "command_progress":
                if pending.on_progress is not None:
                    self._dispatch(pending.on_progress, msg)
                return
            if msg_type == "error":
                code = str(payload.get("code", "error"))
                err_cls = AuthError if code == "revoked" else TetherError
                pending.future.set_exception(err_cls(code, str(payload.get("message", "")), payload, cid))
            else:
                pending.future.set_result(msg)
            return
        if msg_type == "error":
            payload = msg.get("payload") or {}
            code = str(payload.get("code"))
            if not cid:
                self._last_error_code = code
            level = logging.INFO if code == "shutting_down" else logging.WARNING
            log.log(level, "%s: relay error %s (correlationID %s): %s", self._role, code, cid, payload.get("message"))
        if self._consume(msg, received_ms):
            return
        self._dispatch_generic(msg)
