"""tether_client against a real relay: the tether-relay binary on a free port with a temporary
store (TETHER_RELAY_BIN, else target/debug/tether-relay).

Run: /usr/bin/python3 -m unittest discover -s examples/python/tests -v
(`make test` runs it through relay/tests/python_client.rs.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))

from tether_client import AuthError, CommandError, Device, Pilot, Request, TetherError  # noqa: E402

RELAY_BIN = os.environ.get("TETHER_RELAY_BIN") or str(ROOT / "target" / "debug" / "tether-relay")
DEVICE_ID = "py-boat"
# Keeps each wait bounded: every test finishes well within 30 s.
WAIT = 10.0
# Small backoff so a restarted relay is found quickly (the default starts at 0.5 s).
FAST = {"backoff_initial": 0.1, "backoff_max": 2.0}

logging.basicConfig(
    level=logging.DEBUG if os.environ.get("TETHER_PY_DEBUG") else logging.WARNING,
    format="    [%(name)s %(levelname)s] %(message)s",
)

_RELAY_ENV_DROP = (
    "PORT", "BIND_ADDRESS", "TETHER_DATA_DIR", "TETHER_DB", "TETHER_ADMIN_KEY", "LOG_LEVEL",
    "DEBUG_MODE", "PING_INTERVAL", "CONNECTION_TIMEOUT", "TICKET_TTL", "AUTH_TIMEOUT",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class RelayProcess:
    """The real relay binary with its own store, restartable on the same port and database."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tether-py-"))
        self.db = self.dir / "relay.db"
        self.port = free_port()
        self.admin_key = f"tk_pyadmin_{secrets.token_hex(16)}"
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.log_path = self.dir / "relay.log"
        env = {k: v for k, v in os.environ.items() if k not in _RELAY_ENV_DROP}
        env["TETHER_ADMIN_KEY"] = self.admin_key
        env["LOG_LEVEL"] = "info"
        self.env = env

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def cli(self, *args: str) -> dict[str, Any]:
        out = subprocess.run(
            [RELAY_BIN, "--db", str(self.db), "--data-dir", str(self.dir), *args, "--json"],
            env=self.env, capture_output=True, text=True, timeout=30,
        )
        if out.returncode != 0:
            raise AssertionError(f"tether-relay {' '.join(args)} failed: {out.stderr}")
        return json.loads(out.stdout)

    def setup_store(self) -> tuple[str, str]:
        """Create the store, device py-boat and a pilot with admin level; return (secret, key)."""
        subprocess.run(
            [RELAY_BIN, "--db", str(self.db), "--data-dir", str(self.dir), "init"],
            env=self.env, capture_output=True, timeout=30, check=True,
        )
        dev = self.cli("device", "create", "--org", "default", "--id", DEVICE_ID, "--name", "Py")
        op = self.cli("operator", "create", "--username", "ana", "--role", "pilot", "--access", "admin")
        return dev["clientSecret"], op["apiKey"]

    async def start(self) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                RELAY_BIN, "--db", str(self.db), "--data-dir", str(self.dir),
                "--port", str(self.port), "--bind", "127.0.0.1",
                env=self.env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        finally:
            log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the relay did not start; log:\n{self.log_tail()}")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise AssertionError(f"the relay exited at start; log:\n{self.log_tail()}")
            if b"listening on" in line:
                return

    async def stop(self) -> None:
        """SIGTERM (graceful: connections get `shutting_down` and close 1001), then wait."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ClientTests(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        if not os.access(RELAY_BIN, os.X_OK):
            self.fail(f"no relay binary at {RELAY_BIN}: run cargo build -p tether-relay or set TETHER_RELAY_BIN")
        self.started = time.monotonic()
        self.relay = RelayProcess()
        self.secret, self.api_key = await asyncio.to_thread(self.relay.setup_store)
        await self.relay.start()
        self.clients: list[Any] = []

    async def asyncTearDown(self) -> None:
        for c in self.clients:
            await c.close()
        await self.relay.stop()
        self.relay.cleanup()
        elapsed = time.monotonic() - self.started
        self.assertLess(elapsed, 30, f"{self.id()} took {elapsed:.1f} s")

    async def device(self, secret: Optional[str] = None, **options: Any) -> Device:
        d = Device(self.relay.ws, DEVICE_ID, secret or self.secret, **{**FAST, **options})
        self.clients.append(d)
        return d

    async def pilot(self, api_key: Optional[str] = None, **options: Any) -> Pilot:
        p = Pilot(self.relay.http, api_key or self.api_key, **{**FAST, **options})
        self.clients.append(p)
        return p

    # ------------------------------------------------------------------ cases

    async def test_device_authenticates_and_publishes(self) -> None:
        dev = await self.device()
        errors: list[dict[str, Any]] = []
        dev.on_message("error", errors.append)
        leases: list[dict[str, Any]] = []
        dev.on_message("lease_state", leases.append)
        await dev.start(timeout=WAIT)
        self.assertTrue(dev.connected)
        self.assertEqual(dev.client_id, DEVICE_ID)
        self.assertEqual(dev.auth_info["role"], "device")
        self.assertEqual(dev.auth_info["org"], "default")
        for i in range(5):
            self.assertTrue(await dev.publish_telemetry({"battery": {"percent": 90 - i}}))
        self.assertTrue(await dev.publish_telemetry({"fix": 3}, stream="gps", subtype="gps"))
        self.assertEqual(dev._sequences, {"sensor_data": 5, "gps": 1})
        # The relay handles a connection's messages in order: an error about a frame would
        # arrive before the pong.
        rtt = await dev.ping()
        self.assertGreaterEqual(rtt, 0)
        await wait_for(lambda: dev.time_syncs >= 1, "the device to answer time_sync")
        await wait_for(lambda: bool(leases), "the lease_state after auth_ok")
        self.assertEqual(errors, [], "the relay accepted every frame")
        online = await asyncio.to_thread(self._http_get, "/api/devices")
        boat = next(d for d in online["devices"] if d["id"] == DEVICE_ID)
        self.assertTrue(boat["online"])

    async def test_pilot_receives_annotated_frames(self) -> None:
        dev = await self.device()
        pilot = await self.pilot()
        await dev.start(timeout=WAIT)
        await pilot.start(timeout=WAIT)
        self.assertEqual(pilot.auth_info["role"], "pilot")
        frames: list[dict[str, Any]] = []
        sub = await pilot.subscribe(DEVICE_ID, frames.append)
        self.assertEqual(sub, {"deviceID": DEVICE_ID, "online": True, "replayed": 0})
        for i in range(5):
            await dev.publish_telemetry({"i": i})
        await wait_for(lambda: len(frames) >= 5, "5 frames at the pilot")
        self.assertEqual([f["sequence"] for f in frames[:5]], [0, 1, 2, 3, 4])
        for f in frames[:5]:
            self.assertEqual(f["relay"]["verdict"], "ok", f)
            self.assertEqual(f["relay"]["stream"], "sensor_data")
            self.assertEqual(f["relay"]["lostTotal"], 0)
            self.assertEqual(f["epoch"], dev.epoch)
            self.assertIn("receivedAt", f["relay"])
            self.assertIsInstance(f["timestamp"], float)
            self.assertIn("system_time", f)
        # Once the device has answered time_sync, frames carry their age.
        deadline = time.monotonic() + WAIT
        while "ageMs" not in frames[-1]["relay"]:
            self.assertLess(time.monotonic(), deadline, "no frame with ageMs: time_sync_response not used")
            n = len(frames)
            await dev.publish_telemetry({"later": True})
            await wait_for(lambda: len(frames) > n, "another frame")
        self.assertLess(abs(frames[-1]["relay"]["clockOffsetMs"]), 1000)
        # A sequence gap is reported as such: a frame dropped while "offline".
        dev._sequences["sensor_data"] += 2
        n = len(frames)
        await dev.publish_telemetry({"after": "gap"})
        await wait_for(lambda: len(frames) > n, "the frame after the gap")
        self.assertEqual(frames[-1]["relay"]["verdict"], "gap")
        self.assertEqual(frames[-1]["relay"]["missing"], 2)
        # JSON has no NaN: it travels as null instead of being refused as malformed_json.
        n = len(frames)
        await dev.publish_telemetry({"depth": float("nan"), "ok": [1.5, float("inf")]})
        await wait_for(lambda: len(frames) > n, "the frame with NaN")
        self.assertEqual(frames[-1]["data"], {"depth": None, "ok": [1.5, None]})
        # A late subscriber with replay gets the buffered frames, marked as replayed.
        late: list[dict[str, Any]] = []
        pilot2 = await self.pilot()
        await pilot2.start(timeout=WAIT)
        sub2 = await pilot2.subscribe(DEVICE_ID, late.append, replay=True)
        self.assertEqual(sub2["replayed"], len(frames))
        await wait_for(lambda: len(late) >= len(frames), "the replayed frames")
        self.assertTrue(all(f["relay"].get("replay") for f in late))

    async def test_request_answered_by_device_handler(self) -> None:
        dev = await self.device()
        seen: list[Request] = []

        @dev.on_command("execute_command")
        async def run(req: Request) -> dict[str, Any]:
            seen.append(req)
            await req.progress("working\n")
            return {"stdout": " ".join([req.command or "", *req.payload.get("args", [])]), "stderr": "", "exitCode": 0}

        @dev.on_app_command("set_waypoints")
        def set_waypoints(req: Request) -> dict[str, Any]:
            return {"accepted": len(req.data["waypoints"])}

        @dev.on_app_command("explode")
        async def explode(req: Request) -> None:
            raise RuntimeError("boom")

        @dev.on_app_command("refuse")
        async def refuse(req: Request) -> None:
            raise CommandError("robot_unavailable", "the autopilot is off")

        pilot = await self.pilot()
        await dev.start(timeout=WAIT)
        await pilot.start(timeout=WAIT)

        progress: list[dict[str, Any]] = []
        answer = await pilot.request(
            "execute_command", {"command": "echo", "args": ["hi"]}, DEVICE_ID, timeout=WAIT,
            correlation_id="cmd-1", on_progress=progress.append,
        )
        self.assertEqual(answer["type"], "command_output")
        self.assertEqual(answer["correlationID"], "cmd-1")
        self.assertEqual(answer["from"], DEVICE_ID)
        self.assertEqual(answer["clientID"], pilot.client_id)
        self.assertEqual(answer["payload"]["stdout"], "echo hi")
        self.assertEqual(answer["payload"]["exitCode"], 0)
        self.assertIn("durationMs", answer["payload"])
        # The device saw who asked, and the relay's ack and the progress chunk came first.
        self.assertEqual(seen[0].sender, pilot.client_id)
        self.assertEqual(seen[0].correlation_id, "cmd-1")
        self.assertEqual(seen[0].queued, False)
        self.assertEqual([m["type"] for m in progress], ["ack", "command_progress"])
        self.assertEqual(progress[0]["payload"]["status"], "delivered")
        self.assertEqual(progress[1]["payload"], {"stream": "stdout", "data": "working\n", "offset": 0})

        # app_command needs the control lease.
        with self.assertRaises(TetherError) as cm:
            await pilot.request("app_command", {"command": "set_waypoints", "data": {}}, DEVICE_ID, timeout=WAIT)
        self.assertEqual(cm.exception.code, "not_controller")
        lease = await pilot.request("lease_acquire", {"deviceID": DEVICE_ID}, timeout=WAIT)
        self.assertEqual(lease["type"], "ack")
        self.assertEqual(lease["payload"]["data"]["lease"], "acquired")
        wp = {"waypoints": [{"latitude": 37.77, "longitude": -122.42}, {"latitude": 37.78, "longitude": -122.41}]}
        answer = await pilot.request("app_command", {"command": "set_waypoints", "data": wp}, DEVICE_ID, timeout=WAIT)
        self.assertEqual(answer["type"], "command_result")
        self.assertEqual(answer["payload"], {"ok": True, "data": {"accepted": 2}})

        # A handler's exception is command_failed; CommandError keeps its code.
        answer = await pilot.request("app_command", {"command": "explode"}, DEVICE_ID, timeout=WAIT)
        self.assertEqual(answer["payload"]["ok"], False)
        self.assertEqual(answer["payload"]["code"], "command_failed")
        self.assertIn("boom", answer["payload"]["error"])
        with self.assertRaises(CommandError) as cm2:
            await pilot.request("app_command", {"command": "refuse"}, DEVICE_ID, timeout=WAIT, check=True)
        self.assertEqual(cm2.exception.code, "robot_unavailable")
        # No handler: unsupported, at once (not a command_timeout a minute later).
        answer = await pilot.request("reload_config", {}, DEVICE_ID, timeout=WAIT)
        self.assertEqual(answer["payload"]["code"], "unsupported")

    async def test_queued_request_answered_when_device_connects(self) -> None:
        pilot = await self.pilot()
        await pilot.start(timeout=WAIT)
        interim: list[dict[str, Any]] = []
        pending = asyncio.create_task(
            pilot.request("execute_command", {"command": "uptime"}, DEVICE_ID, timeout=WAIT, on_progress=interim.append)
        )
        await wait_for(lambda: bool(interim), "the ack")
        self.assertEqual(interim[0]["payload"]["status"], "queued")
        dev = await self.device()
        runs: list[Request] = []
        dev.handle("execute_command", lambda req: runs.append(req) or "up 3 days\n")
        await dev.start(timeout=WAIT)
        answer = await pending
        self.assertEqual(answer["type"], "command_output")
        self.assertEqual(answer["payload"]["stdout"], "up 3 days\n")
        self.assertEqual(len(runs), 1)
        self.assertTrue(runs[0].queued)

    async def test_relay_error_raises_tether_error(self) -> None:
        pilot = await self.pilot()
        await pilot.start(timeout=WAIT)
        with self.assertRaises(TetherError) as cm:
            await pilot.request("execute_command", {"command": "ls"}, "no-such-boat", timeout=WAIT)
        self.assertEqual(cm.exception.code, "unknown_target")
        self.assertTrue(cm.exception.correlation_id)
        with self.assertRaises(TetherError) as cm:
            await pilot.subscribe("no-such-boat", lambda p: None)
        self.assertEqual(cm.exception.code, "unknown_target")
        self.assertNotIn("no-such-boat", pilot.subscriptions)
        # Offline device, a type that is never queued.
        with self.assertRaises(TetherError) as cm:
            await pilot.request("docker_command", {"action": "ps"}, DEVICE_ID, timeout=WAIT)
        self.assertEqual(cm.exception.code, "target_offline")
        self.assertTrue(pilot.connected, "errors do not end the connection")

    async def test_wrong_credentials_raise_auth_error(self) -> None:
        dev = await self.device(secret="0" * 64)
        t0 = time.monotonic()
        with self.assertRaises(AuthError) as cm:
            await dev.start(timeout=WAIT)
        self.assertEqual(cm.exception.code, "auth_failed")
        self.assertEqual(dev.attempts, 1, "no retry after the relay refused the secret")
        with self.assertRaises(AuthError):
            await dev.send("ping")
        pilot = await self.pilot(api_key="tk_000000000000_" + "0" * 64)
        with self.assertRaises(AuthError) as cm:
            await pilot.start(timeout=WAIT)
        self.assertEqual(cm.exception.code, "auth_failed")
        self.assertEqual(pilot.attempts, 1)
        self.assertLess(time.monotonic() - t0, 5, "refusals are immediate")

    async def test_revoked_credential_stops_the_client(self) -> None:
        dev = await self.device()
        await dev.start(timeout=WAIT)
        await asyncio.to_thread(self._http_post, f"/api/devices/{DEVICE_ID}/revoke")
        with self.assertRaises(AuthError) as cm:
            await asyncio.wait_for(dev.wait_closed(), WAIT)
        self.assertEqual(cm.exception.code, "revoked")
        self.assertEqual(dev.attempts, 1, "no reconnection with a revoked secret")
        self.assertFalse(dev.connected)

    async def test_reconnects_after_relay_restart(self) -> None:
        dev = await self.device()
        pilot = await self.pilot()
        frames: list[dict[str, Any]] = []
        await dev.start(timeout=WAIT)
        await pilot.start(timeout=WAIT)
        await pilot.subscribe(DEVICE_ID, frames.append)

        stop = asyncio.Event()

        async def publish() -> None:
            while not stop.is_set():
                await dev.publish_telemetry({"t": time.time()})
                await asyncio.sleep(0.05)

        publisher = asyncio.create_task(publish())
        try:
            await wait_for(lambda: len(frames) >= 3, "frames before the restart")
            await self.relay.stop()
            await wait_for(lambda: not dev.connected and not pilot.connected, "both to notice the relay is gone")
            dropped_before = dev.frames_dropped
            n = len(frames)
            await asyncio.sleep(0.2)  # let the publisher hit the closed link
            await self.relay.start()
            await wait_for(lambda: dev.connect_count == 2, "the device to reconnect")
            await wait_for(lambda: pilot.connect_count == 2, "the pilot to reconnect")
            await wait_for(lambda: len(frames) >= n + 3, "frames after the restart (resubscribed)")
        finally:
            stop.set()
            await publisher
        after = frames[n:]
        self.assertGreater(dev.frames_dropped, dropped_before, "frames published while offline were dropped")
        self.assertGreater(after[0]["sequence"], frames[n - 1]["sequence"], "sequence numbers carry on")
        # The restarted relay tracks the stream afresh: the first frame is ok, then +1 each.
        self.assertEqual([f["relay"]["verdict"] for f in after[:3]], ["ok", "ok", "ok"])
        self.assertEqual(pilot.subscriptions, [DEVICE_ID])
        self.assertTrue(dev.connected and pilot.connected)

    async def test_heartbeat_detects_a_dead_link(self) -> None:
        # A frozen relay keeps the TCP connection open but answers nothing: only the JSON ping
        # heartbeat notices.
        pilot = await self.pilot(ping_interval=0.2, ping_timeout=0.5, open_timeout=1.0, http_timeout=1.0)
        await pilot.start(timeout=WAIT)
        await wait_for(lambda: pilot.rtt_ms is not None, "a heartbeat pong")
        assert self.relay.proc is not None
        os.kill(self.relay.proc.pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: not pilot.connected, "the pilot to declare the frozen link dead", timeout=5)
        finally:
            os.kill(self.relay.proc.pid, signal.SIGCONT)
        await wait_for(lambda: pilot.connect_count == 2, "the pilot to reconnect")
        self.assertTrue(pilot.connected)

    # ------------------------------------------------------------------ helpers

    def _http_post(self, path: str) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(
            self.relay.http + path, data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {self.relay.admin_key}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def _http_get(self, path: str) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(self.relay.http + path, headers={"Authorization": f"Bearer {self.relay.admin_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


if __name__ == "__main__":
    unittest.main()
