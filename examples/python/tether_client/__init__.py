"""tether_client: a small asyncio client for the Tether relay's native protocol.

Two roles, one connection each, with authentication, heartbeats and reconnection built in:

- :class:`Device`: robot software connecting as a device (``/ws?clientID=``, its secret as
  ``Authorization: Bearer``): publishes telemetry, answers the relay's clock sync, answers
  operators' requests with handlers.
- :class:`Pilot`: an operator with an API key (one-time ticket, ``/ws/admin``): subscribes to
  telemetry, sends requests and awaits their answers.

Needs Python 3.11 and ``websockets`` 10.x (Debian: ``python3-websockets``). The protocol is in
docs/protocol.md.
"""

from .device import REQUEST_TYPES, Device, Reply, Request
from .errors import AuthError, CommandError, NotConnectedError, TetherError
from .pilot import Pilot

__all__ = [
    "AuthError",
    "CommandError",
    "Device",
    "NotConnectedError",
    "Pilot",
    "REQUEST_TYPES",
    "Reply",
    "Request",
    "TetherError",
]
