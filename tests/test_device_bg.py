"""bench/device/bg.sh: background jobs that outlive a device call (start, wait, stop, status, collect)."""
from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

BG = Path(__file__).resolve().parents[1] / "bench" / "device" / "bg.sh"


def bg(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "BG_RESULTS": str(tmp_path / "results"), "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(BG), *args], env=env, capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


def test_a_job_runs_after_the_starting_call_returns_and_keeps_its_exit_code(tmp_path):
    (tmp_path / "out").mkdir()
    assert "started" in bg(tmp_path, "start", "ok", "sleep 1; echo done-here; exit 3")
    assert "already running" in bg(tmp_path, "start", "ok", "true")  # one job of a name at a time
    shown = bg(tmp_path, "wait", "ok", "20")
    assert "ended, exit 3" in shown and "done-here" in shown
    assert "results.tar.gz" in bg(tmp_path, "collect")
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert "./bg-ok.log" in tar.getnames()


def test_stop_kills_the_whole_process_group(tmp_path):
    bg(tmp_path, "start", "long", "sleep 300 & sleep 300; wait")
    assert "running since" in bg(tmp_path, "status")
    shown = bg(tmp_path, "stop", "long")
    assert "ended without an exit code" in shown
    pid = int((tmp_path / "results" / "bg-long.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the child sleeps went with the group
        os.killpg(pid, 0)


def test_wait_gives_up_after_its_seconds(tmp_path):
    bg(tmp_path, "start", "slow", "sleep 30")
    assert "running since" in bg(tmp_path, "wait", "slow", "1")
    bg(tmp_path, "stop", "slow")
