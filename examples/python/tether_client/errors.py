"""Exceptions raised by tether_client."""

from __future__ import annotations

from typing import Any, Optional


class TetherError(Exception):
    """An error reported by the relay (an ``error`` message) or by this library.

    ``code`` is the stable snake_case code of docs/protocol.md section 7.1 (``unknown_target``,
    ``forbidden``, ``command_timeout``, ...); match on it, not on ``message``.
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        payload: Optional[dict[str, Any]] = None,
        correlation_id: Optional[str] = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.payload: dict[str, Any] = dict(payload or {})
        self.correlation_id = correlation_id

    @property
    def retry_after_ms(self) -> Optional[float]:
        """``retryAfterMs`` of a ``rate_limited`` error, else None."""
        value = self.payload.get("retryAfterMs")
        return float(value) if isinstance(value, (int, float)) else None


class AuthError(TetherError):
    """The relay refused the credential (device secret or operator API key).

    Raised by ``start()`` and by every later call once it happened; the client stops and does
    not retry: a wrong, revoked or withdrawn credential will not start working by itself.
    """


class NotConnectedError(TetherError):
    """The client has no authenticated connection right now (it may be reconnecting)."""

    def __init__(self, message: str = "not connected to the relay") -> None:
        super().__init__("not_connected", message)


class CommandError(TetherError):
    """A command that did not succeed.

    Device side: raise it from a command handler to answer ``command_result`` with ``ok:false``
    and this ``code`` (it must be one of the codes of protocol.md 7.1, e.g. ``unsupported``,
    ``unknown_process``, ``invalid_config``; the relay refuses unknown codes).
    Pilot side: ``request(..., check=True)`` raises it when the device answered ``ok:false``.
    """

    def __init__(
        self,
        code: str = "command_failed",
        message: str = "",
        data: Any = None,
        correlation_id: Optional[str] = None,
    ) -> None:
        super().__init__(code, message, correlation_id=correlation_id)
        self.data = data
