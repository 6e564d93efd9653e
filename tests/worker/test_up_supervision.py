"""``retinalgpt up`` supervises its children (issue 18 item 11): a killed node is restarted with backoff and
logged, ``up`` keeps running; a child that keeps failing right after its start ends ``up`` with status 1 for
systemd/compose to take over; SIGTERM still stops everything with status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dicom_node.dicom_fixtures import echoscu
from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.roles import Supervisor


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    found = {}
    for child in map(int, out.split()):
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            pass
    return found


def _node_pid(up_pid: int) -> int | None:
    nodes = [pid for pid, cmd in _children(up_pid).items() if " node " in f"{cmd} "]
    return nodes[0] if len(nodes) == 1 else None


def test_up_restarts_a_killed_node(tmp_path: Path, config_file) -> None:
    port = free_port()
    config = config_file(port=port, extra="[model]\nenabled = false\n")
    roles = Roles(config, tmp_path / "logs")
    up = roles.start("up", "up", "--no-api")
    try:
        wait_for(lambda: echoscu(port).returncode == 0, 90, "the node under up", diagnostics=lambda: roles.log("up"))
        first = _node_pid(up.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: (pid := _node_pid(up.pid)) is not None and pid != first, 30, "a new node process",
                 interval=0.2, diagnostics=lambda: roles.log("up"))
        wait_for(lambda: echoscu(port).returncode == 0, 60, "the restarted node to answer",
                 diagnostics=lambda: roles.log("up"))
        assert up.poll() is None, roles.log("up")
        assert f"node (pid {first}) exited with status -9; restarting it in 1 s" in roles.log("up")
        children = list(_children(up.pid))
        assert len(children) == 3
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, roles.log("up")
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        roles.stop_all()


class _Commands(Supervisor):
    """The real supervisor with plain Python one-liners as its roles."""

    def _command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-c", args[0]]


def test_supervisor_gives_up_on_a_child_that_keeps_failing() -> None:
    supervisor = _Commands(None, [("steady", ["import time; time.sleep(60)"]), ("broken", ["raise SystemExit(3)"])],
                           backoff=0.05, stable_after=30, give_up_after=3)
    supervisor.start()
    steady = supervisor.children[0].process
    started = time.monotonic()
    assert supervisor.wait() == 1
    assert time.monotonic() - started < 15
    assert steady.poll() is not None  # everything was stopped


def test_supervisor_stops_with_status_0_when_asked() -> None:
    supervisor = _Commands(None, [("steady", ["import time; time.sleep(60)"])])
    supervisor.start()
    supervisor.request_stop()
    assert supervisor.wait() == 0
    assert supervisor.children[0].process.poll() is not None
