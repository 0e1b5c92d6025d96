"""The operator side: a pilot's (or admin's) connection with an API key (``/ws/admin``)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Union

from ._base import JSON, _Client, log
from .errors import AuthError, TetherError

TelemetryHandler = Callable[[JSON], Union[None, Awaitable[None]]]


@dataclass
class _Subscription:
    handler: TelemetryHandler
    replay: bool
    logs: bool
    #: relay.receivedAt of the newest frame handed to the handler: replayed frames at or before
    #: it were already seen (a resubscription's replay only fills the gap).
    last_received_at: float = float("-inf")


class Pilot(_Client):
    """An operator connection: trades the API key for a one-time ticket
    (``POST /api/auth/ws-ticket``), connects to ``/ws/admin``, and on every reconnection gets a
    fresh ticket and subscribes again.

    Example::

        async with Pilot("http://relay:8000", api_key) as pilot:
            await pilot.subscribe("boat-1", lambda p: print(p["sequence"], p["relay"]["verdict"]))
            out = await pilot.request("execute_command", {"command": "uptime"}, "boat-1")
            print(out["payload"]["stdout"])
    """

    _role = "pilot"

    def __init__(self, base_http_url: str, api_key: str, *, http_timeout: float = 10.0, **options: Any) -> None:
        """Args:
            base_http_url: the relay, ``http://host:8000`` (``https://`` with TLS).
            api_key: an operator API key (``tk_...``); it never goes into a URL.
            http_timeout: limit for the ticket request, seconds.
            **options: connection settings of the base class (``ping_interval``,
                ``ping_timeout``, ``backoff_initial``, ``backoff_max``, ``stable_after``,
                ``open_timeout``).
        """
        super().__init__(**options)
        self.base_http_url = base_http_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_http_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"base_http_url must be http:// or https://, not {base_http_url!r}")
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self._ws_base = urllib.parse.urlunsplit((ws_scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._api_key = api_key
        self.http_timeout = http_timeout
        self._subscriptions: dict[str, _Subscription] = {}

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(
        self,
        device_id: str,
        handler: TelemetryHandler,
        *,
        replay: bool = False,
        logs: bool = False,
        timeout: float = 10.0,
    ) -> Optional[JSON]:
        """Receive ``device_id``'s telemetry: ``handler(payload)`` (sync or async) per frame,
        in order, with the relay's annotations in ``payload["relay"]`` (``verdict``,
        ``missing``, ``lostTotal``, ``ageMs``, ...). The subscription is renewed after every
        reconnection (subscriptions end with a connection).

        Args:
            device_id: the device.
            handler: called with each frame's payload.
            replay: ask for the relay's buffered frames first (``relay.replay`` is true on
                them). After a reconnection only the buffered frames newer than the last one
                seen are handed over.
            logs: also receive the device's ``log`` lines (see ``on_message("log", ...)``).
            timeout: seconds to wait for ``subscribed``.

        Returns:
            The ``subscribed`` payload (``online``, ``replayed``); None if not connected right
            now (the subscription is made on connecting).

        Raises:
            TetherError: ``unknown_target`` or ``forbidden``; the subscription is dropped.
        """
        sub = _Subscription(handler, replay, logs)
        previous = self._subscriptions.get(device_id)
        self._subscriptions[device_id] = sub
        if not self.connected:
            return None
        try:
            answer = await self.request(
                "subscribe", {"deviceID": device_id, "replay": replay, "logs": logs}, timeout=timeout
            )
        except TetherError as e:
            if e.code in ("unknown_target", "forbidden") and self._subscriptions.get(device_id) is sub:
                del self._subscriptions[device_id]
                if previous is not None:
                    self._subscriptions[device_id] = previous
            raise
        return answer.get("payload")

    async def unsubscribe(self, device_id: str, timeout: float = 10.0) -> None:
        """Stop receiving ``device_id``'s telemetry."""
        self._subscriptions.pop(device_id, None)
        if self.connected:
            await self.request("unsubscribe", {"deviceID": device_id}, timeout=timeout)

    @property
    def subscriptions(self) -> list[str]:
        """The devices this pilot subscribes to (renewed on every connection)."""
        return list(self._subscriptions)

    # ------------------------------------------------------------------ internals

    def _fetch_ticket(self) -> str:
        """``POST /api/auth/ws-ticket`` (blocking; run in a thread)."""
        req = urllib.request.Request(
            f"{self.base_http_url}/api/auth/ws-ticket",
            data=b"",
            method="POST",
            headers={"Authorization": f"Bearer {self._api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read()).get("error", {})
            except (ValueError, AttributeError):
                err = {}
            code = str(err.get("code") or f"http_{e.code}")
            message = str(err.get("message") or e.reason)
            if e.code in (401, 403):
                raise AuthError(code, f"POST /api/auth/ws-ticket: {e.code} {message}") from None
            retry = {"retryAfterMs": 5000} if e.code == 429 else None
            raise TetherError(code, f"POST /api/auth/ws-ticket: {e.code} {message}", retry) from None
        ticket = body.get("ticket") if isinstance(body, dict) else None
        if not isinstance(ticket, str):
            raise TetherError("unexpected", "POST /api/auth/ws-ticket answered without a ticket")
        return ticket

    async def _prepare(self) -> tuple[str, dict[str, str]]:
        ticket = await asyncio.to_thread(self._fetch_ticket)
        return f"{self._ws_base}/ws/admin?ticket={urllib.parse.quote(ticket)}", {}

    def _on_authenticated(self) -> None:
        if self._subscriptions:
            self._spawn(self._resubscribe(), "resubscribe")

    async def _resubscribe(self) -> None:
        for device_id, sub in list(self._subscriptions.items()):
            try:
                await self.request(
                    "subscribe", {"deviceID": device_id, "replay": sub.replay, "logs": sub.logs}, timeout=10.0
                )
                log.info("pilot: subscribed to %s again", device_id)
            except TetherError as e:
                log.error("pilot: cannot subscribe to %s again: %s", device_id, e)
                if e.code in ("unknown_target", "forbidden") and self._subscriptions.get(device_id) is sub:
                    del self._subscriptions[device_id]
            except TimeoutError as e:
                log.warning("pilot: resubscribing to %s: %s", device_id, e)

    def _consume(self, msg: JSON, received_ms: float) -> bool:
        if msg.get("type") != "telemetry":
            return False
        sub = self._subscriptions.get(str(msg.get("from")))
        payload = msg.get("payload")
        if sub is not None and isinstance(payload, dict):
            annotation = payload.get("relay") if isinstance(payload.get("relay"), dict) else {}
            received_at = annotation.get("receivedAt")
            if isinstance(received_at, (int, float)):
                if annotation.get("replay") and received_at <= sub.last_received_at:
                    return True  # seen before this reconnection
                sub.last_received_at = max(sub.last_received_at, float(received_at))
            self._dispatch(sub.handler, payload)
        for h in self._handlers.get("telemetry", []) + self._handlers.get("*", []):
            self._dispatch(h, msg)
        return True
