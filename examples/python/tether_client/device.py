"""The device side: a robot's own connection to the relay (``/ws?clientID=``)."""

from __future__ import annotations

import asyncio
import collections
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

from ._base import JSON, _Client, _maybe_await, encode, log, now_ms
from .errors import CommandError, NotConnectedError

#: Routed requests an operator can send a device (protocol.md 4.3). Each gets exactly one reply.
REQUEST_TYPES = frozenset(
    {
        "execute_command",
        "docker_command",
        "process_command",
        "update_client_config",
        "reload_config",
        "get_client_config",
        "speed_test",
        "app_command",
    }
)

#: The reply type of each request type (everything else answers ``command_result``).
REPLY_TYPES = {"execute_command": "command_output", "speed_test": "speed_test_result"}


@dataclass
class Reply:
    """Return this from a command handler to choose the reply's type and payload yourself."""

    type: str
    payload: JSON


@dataclass
class Request:
    """A routed request from an operator, as a command handler sees it."""

    device: "Device"
    type: str
    payload: JSON
    correlation_id: Optional[str]
    #: The operator who sent it (``from``); the reply goes back to it.
    sender: Optional[str]
    #: True when the relay delivered it from its offline queue (sent while we were offline).
    queued: bool
    #: The whole envelope as received.
    message: JSON
    _offsets: dict[str, int] = field(default_factory=dict)

    @property
    def command(self) -> Optional[str]:
        """``payload.command`` (the program of ``execute_command``, the name of an ``app_command``)."""
        value = self.payload.get("command")
        return value if isinstance(value, str) else None

    @property
    def data(self) -> Any:
        """``payload.data`` (the arguments of an ``app_command``)."""
        return self.payload.get("data")

    async def progress(self, text: str, stream: str = "stdout") -> None:
        """Send a ``command_progress`` chunk (output of a running ``execute_command``) to the
        requester. Does not end the request; the handler's return value does."""
        offset = self._offsets.get(stream, 0)
        self._offsets[stream] = offset + len(text.encode())
        await self.device.send(
            "command_progress",
            {"stream": stream, "data": text, "offset": offset},
            client_id=self.sender,
            correlation_id=self.correlation_id,
        )


CommandHandler = Callable[[Request], Union[Any, Awaitable[Any]]]


class Device(_Client):
    """A device connection: authenticates with its secret, answers the relay's clock sync,
    publishes telemetry and answers operators' requests with handlers.

    Example::

        device = Device("ws://relay:8000/ws", "boat-1", secret)

        @device.on_app_command("set_waypoints")
        async def set_waypoints(req):
            planner.load(req.data["waypoints"])
            return {"accepted": len(req.data["waypoints"])}

        async with device:
            await device.publish_telemetry({"battery": {"percent": 97}})
    """

    _role = "device"

    def __init__(
        self,
        url: str,
        client_id: str,
        secret: str,
        *,
        epoch: Optional[str] = None,
        reply_wait: float = 30.0,
        **options: Any,
    ) -> None:
        """Args:
            url: the relay's device endpoint, ``ws://host:8000/ws`` (``wss://`` with TLS;
                ``http(s)://host:8000`` is accepted and turned into it).
            client_id: the device id (``clientID``).
            secret: its ``clientSecret`` (sent as ``Authorization: Bearer``).
            epoch: the telemetry ``epoch`` (boot id); default: a new random one per instance,
                so the relay sees a restarted program as a ``reset``, not a gap.
            reply_wait: how long a finished handler's reply waits for a connection when the
                link is down, in seconds, before it is dropped.
            **options: connection settings of the base class (``ping_interval``,
                ``ping_timeout``, ``backoff_initial``, ``backoff_max``, ``stable_after``,
                ``open_timeout``).
        """
        super().__init__(**options)
        self.url = _device_url(url, client_id)
        self.client_id = client_id
        self._secret = secret
        #: The telemetry epoch sent with every frame.
        self.epoch = epoch or uuid.uuid4().hex[:8]
        self.reply_wait = reply_wait
        #: ``time_sync`` requests answered so far.
        self.time_syncs = 0
        #: Telemetry frames sent, and frames dropped because the link was down.
        self.frames_sent = 0
        self.frames_dropped = 0
        self._sequences: dict[str, int] = {}
        self._command_handlers: dict[str, CommandHandler] = {}
        self._app_handlers: dict[str, CommandHandler] = {}
        # (requester, correlationID) -> our reply (None while the handler runs), to answer the
        # offline queue's re-deliveries without running a command twice.
        self._answered: "collections.OrderedDict[tuple[str, str], Optional[JSON]]" = collections.OrderedDict()

    # ------------------------------------------------------------------ handlers

    def handle(self, msg_type: str, handler: CommandHandler) -> CommandHandler:
        """Answer requests of ``msg_type`` (``execute_command``, ``app_command``,
        ``update_client_config``, ...) with ``handler(request)`` (sync or async).

        The return value becomes the reply, sent with the request's correlationID and
        ``clientID`` = the requester:

        - ``execute_command``: a ``command_output``; a dict is its payload (``stdout``,
          ``stderr``, ``exitCode``; ``durationMs`` is filled in), a string is the ``stdout``
          with exit code 0.
        - ``speed_test``: a ``speed_test_result`` with the returned dict.
        - anything else: ``command_result`` ``{"ok": true, "data": <return value>}``.
        - a :class:`Reply`: sent as it is.

        Raising :class:`CommandError` answers ``command_result`` ``ok:false`` with its code;
        any other exception answers ``ok:false`` with code ``command_failed``. A request type
        without a handler is answered ``ok:false`` ``unsupported``.
        """
        self._command_handlers[msg_type] = handler
        return handler

    def on_command(self, msg_type: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator form of :meth:`handle`: ``@device.on_command("execute_command")``."""
        return lambda fn: self.handle(msg_type, fn)

    def on_app_command(self, command: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator: handle ``app_command`` requests whose ``payload.command`` is ``command``
        (``set_waypoints``, ``teleop``, ...); ``request.data`` holds the arguments. Takes
        precedence over a general ``app_command`` handler."""

        def register(fn: CommandHandler) -> CommandHandler:
            self._app_handlers[command] = fn
            return fn

        return register

    # ------------------------------------------------------------------ telemetry

    async def publish_telemetry(
        self,
        data: Any,
        stream: Optional[str] = None,
        subtype: str = "sensor_data",
        *,
        timestamp: Optional[float] = None,
        **extra: Any,
    ) -> bool:
        """Publish one telemetry frame (protocol.md 4.9).

        ``sequence`` counts per stream (``stream``, else ``subtype``) from 0; the frame carries
        this instance's ``epoch``, ``timestamp`` (when the data was sampled, default now) and
        ``system_time`` (now), both in ms since the Unix epoch.

        Args:
            data: the values (any JSON; NaN and infinities are sent as null).
            stream: the sequence stream; default: ``subtype``.
            subtype: the kind of frame.
            timestamp: sample time in ms since the Unix epoch, if not now.
            **extra: further payload fields, forwarded by the relay as they are.

        Returns:
            True if sent; False if the link is down (the frame is dropped, but its sequence
            number is used, so subscribers see the loss as a ``gap``).

        Raises:
            AuthError: the client stopped because the relay refused the credential.
        """
        key = stream or subtype
        seq = self._sequences.get(key, 0)
        self._sequences[key] = seq + 1
        now = now_ms()
        payload: JSON = {
            "subtype": subtype,
            "sequence": seq,
            "timestamp": timestamp if timestamp is not None else now,
            "system_time": now,
            "epoch": self.epoch,
            "data": data,
        }
        if stream is not None:
            payload["stream"] = stream
        payload.update(extra)
        try:
            await self.send("telemetry", payload)
        except NotConnectedError:
            self.frames_dropped += 1
            return False
        self.frames_sent += 1
        return True

    # ------------------------------------------------------------------ internals

    async def _prepare(self) -> tuple[str, dict[str, str]]:
        return self.url, {"Authorization": f"Bearer {self._secret}"}

    def _consume(self, msg: JSON, received_ms: float) -> bool:
        msg_type = msg.get("type")
        if msg_type == "time_sync":
            self._answer_time_sync(msg, received_ms)
            return True
        if msg_type in REQUEST_TYPES:
            self._start_request(msg)
            return True
        return False

    def _answer_time_sync(self, msg: JSON, received_ms: float) -> None:
        """``time_sync {t1}`` -> ``time_sync_response {t1, t2, t3}`` (protocol.md 4.8): t1
        echoed unchanged, t2 = our clock when it arrived, t3 = our clock when we answer (the
        same clock as telemetry ``timestamp``). Answered at once, from the reader."""
        t1 = (msg.get("payload") or {}).get("t1")
        if not isinstance(t1, (int, float)) or self._ws is None:
            return
        ws = self._ws
        answer = {"type": "time_sync_response", "payload": {"t1": t1, "t2": received_ms, "t3": max(now_ms(), received_ms)}}
        self.time_syncs += 1
        self._spawn(_send_quietly(ws, encode(answer)), "time_sync_response")

    def _start_request(self, msg: JSON) -> None:
        cid = msg.get("correlationID")
        sender = msg.get("from")
        key = (str(sender), cid) if isinstance(cid, str) else None
        if key is not None and msg.get("_offline_queued") and key in self._answered:
            cached = self._answered[key]
            if cached is None:
                log.info("device: %s %s is already running; ignoring the queue's re-delivery", msg.get("type"), cid)
            else:
                log.info("device: %s %s was answered before; sending the answer again", msg.get("type"), cid)
                self._spawn(self._deliver(cached), f"reply-{cid}")
            return
        if key is not None:
            self._answered[key] = None
            while len(self._answered) > 512:
                self._answered.popitem(last=False)
        self._spawn(self._run_request(msg), f"request-{msg.get('type')}-{cid}")

    def _handler_for(self, msg_type: str, payload: JSON) -> Optional[CommandHandler]:
        if msg_type == "app_command":
            name = payload.get("command")
            if isinstance(name, str) and name in self._app_handlers:
                return self._app_handlers[name]
        return self._command_handlers.get(msg_type)

    async def _run_request(self, msg: JSON) -> None:
        msg_type = str(msg.get("type"))
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        cid = msg.get("correlationID") if isinstance(msg.get("correlationID"), str) else None
        sender = msg.get("from") if isinstance(msg.get("from"), str) else None
        req = Request(self, msg_type, payload, cid, sender, bool(msg.get("_offline_queued")), msg)
        handler = self._handler_for(msg_type, payload)
        started = time.monotonic()
        reply_type, reply_payload = "command_result", {}
        if handler is None:
            what = f"{msg_type} {payload.get('command')!r}" if msg_type == "app_command" else msg_type
            reply_payload = {"ok": False, "code": "unsupported", "error": f"no handler for {what} on this device"}
            log.warning("device: no handler for %s (from %s)", what, sender)
        else:
            try:
                result = await _maybe_await(handler(req))
                duration = int((time.monotonic() - started) * 1000)
                reply_type, reply_payload = _shape_reply(msg_type, result, duration)
            except CommandError as e:
                reply_payload = {"ok": False, "code": e.code, "error": e.message or e.code}
                if e.data is not None:
                    reply_payload["data"] = e.data
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("device: handler for %s %s failed", msg_type, cid)
                reply_payload = {"ok": False, "code": "command_failed", "error": f"{type(e).__name__}: {e}"}
        reply: JSON = {"type": reply_type, "payload": reply_payload}
        if cid is not None:
            reply["correlationID"] = cid
        if sender is not None:
            reply["clientID"] = sender
        if cid is not None and sender is not None and (sender, cid) in self._answered:
            self._answered[(sender, cid)] = reply
        await self._deliver(reply)

    async def _deliver(self, reply: JSON) -> None:
        """Send a reply, waiting up to ``reply_wait`` for the link if it is down (it names the
        requester in ``clientID``, so it finds its way on a new connection too)."""
        deadline = time.monotonic() + self.reply_wait
        while True:
            try:
                await self._send_json(reply)
                return
            except NotConnectedError:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("device: dropping the %s for %s: no connection", reply["type"], reply.get("correlationID"))
                    return
                try:
                    await self.wait_connected(left)
                except (TimeoutError, NotConnectedError):
                    pass


async def _send_quietly(ws: Any, text: str) -> None:
    try:
        await ws.send(text)
    except Exception as e:  # the link closed meanwhile; the reader reports it
        log.debug("device: could not send: %s", e)


def _shape_reply(msg_type: str, result: Any, duration_ms: int) -> tuple[str, JSON]:
    if isinstance(result, Reply):
        return result.type, result.payload
    reply_type = REPLY_TYPES.get(msg_type, "command_result")
    if reply_type == "command_output":
        if isinstance(result, dict):
            out: JSON = dict(result)
        else:
            out = {"stdout": "" if result is None else str(result), "stderr": "", "exitCode": 0}
        out.setdefault("durationMs", duration_ms)
        return reply_type, out
    if reply_type == "speed_test_result":
        return reply_type, dict(result) if isinstance(result, dict) else {}
    out = {"ok": True}
    if result is not None:
        out["data"] = result
    return reply_type, out


def _device_url(url: str, client_id: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "clientID"] + [("clientID", client_id)]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))
