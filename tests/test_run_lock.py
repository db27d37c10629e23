"""One writer per run folder (issue 26): a second writer is refused with the process that holds the folder, and a
lock left by a dead process does not block. Two real processes."""

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from proreflow.cli import app
from proreflow.errors import ProReflowError
from proreflow.run_lock import run_lock

HOLD = "import sys, time; from proreflow.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(120)\n"


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock of tmp_path / 'run' until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path, holder):
    folder = tmp_path / "run"
    with pytest.raises(ProReflowError, match=rf"being written by another process \(pid {holder.pid}: .*run_lock"):
        with run_lock(folder):
            pass
    assert list(folder.iterdir()) == []  # the lock is on the folder itself: nothing is added to it
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with run_lock(folder):  # the kernel dropped the dead process's lock
        pass
    with run_lock(folder):  # and a finished block released ours
        pass


def test_train_on_a_folder_another_process_is_writing_exits_2_and_writes_nothing(tmp_path, holder):
    r = CliRunner().invoke(app, ["train", "--method", "proreflow", "--steps", "2", "--budget", "4", "--base-steps", "2",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert f"being written by another process (pid {holder.pid}" in r.stderr
    assert list((tmp_path / "run").iterdir()) == []  # no run.json: refused before any work


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "run"):
            raise RuntimeError("boom")
    started = time.perf_counter()
    with run_lock(tmp_path / "run"):
        pass
    assert time.perf_counter() - started < 1.0
