"""The run directory's lock (one trainer at a time, stale locks taken over) and the resume config check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from stereo.config import ConfigError, dump_yaml, load_config
from stereo.train import rundir
from stereo.train.failures import Aborted, RunDirBusy
from stereo.train.rundir import RunDirLock, check_resume_config, config_changes


def write_holder(path, **fields) -> None:
    me = RunDirLock(path.parent).me
    path.write_text(json.dumps({**me, "heartbeat": time.time(), **fields}))


def test_lock_is_exclusive_and_released(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on "):
        RunDirLock(tmp_path).acquire()  # the same live process counts as a live holder
    first.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()
    RunDirLock(tmp_path).acquire().release()


def test_lock_of_a_dead_process_on_this_machine_is_taken_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_holder(tmp_path / rundir.LOCK_FILE, pid=dead.pid, started="1")
    started = time.monotonic()
    lock = RunDirLock(tmp_path).acquire()
    assert time.monotonic() - started < 2
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_from_another_machine_waits_for_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "STALE_S", 1.5)
    path = tmp_path / rundir.LOCK_FILE
    write_holder(path, host="node-that-vanished", pid=1)  # silent from now on
    started = time.monotonic()
    lock = RunDirLock(tmp_path).acquire()
    assert 1.5 <= time.monotonic() - started < 6
    lock.release()

    write_holder(path, host="node-alive", pid=1)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.3):
            write_holder(path, host="node-alive", pid=1)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunDirBusy, match="pid 1 on node-alive"):
            RunDirLock(tmp_path).acquire()
    finally:
        stop.set()
        thread.join()

    write_holder(path, host="node-long-gone", pid=1, heartbeat=time.time() - 3600)
    started = time.monotonic()
    RunDirLock(tmp_path).acquire().release()
    assert time.monotonic() - started < 1


def test_heartbeat_moves_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.2)
    lock = RunDirLock(tmp_path).acquire()
    first = json.loads((tmp_path / rundir.LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.7)
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["heartbeat"] > first
    lock.release()


def test_config_changes_split_into_allowed_and_refused(tmp_path):
    stored = dump_yaml(load_config("tiny"))
    allowed = load_config("tiny", ["train.steps=900", "logging.every=5", "checkpoint.every=7", "data.val=[]"])
    assert [key for key, *_ in check_resume_config(stored, allowed, tmp_path)] == [
        "checkpoint.every", "data.val", "logging.every", "train.steps"]
    refused = load_config("tiny", ["train.steps=900", "model.hidden_dims=[8,8,8]", "optim.lr=0.5"])
    with pytest.raises(ConfigError) as info:
        check_resume_config(stored, refused, tmp_path)
    assert "2 key(s) differ: model.hidden_dims: [16, 16, 16] -> [8, 8, 8]; optim.lr: 0.001 -> 0.5" in str(info.value)
    forced = load_config("tiny", ["model.hidden_dims=[8,8,8]", "train.allow_config_change=true"])
    assert {key for key, *_ in check_resume_config(stored, forced, tmp_path)} == {
        "model.hidden_dims", "train.allow_config_change"}
    assert config_changes(stored, load_config("tiny")) == []


def test_a_second_ctrl_c_after_the_debounce_aborts():
    from stereo.train.signals import INTERRUPT_DEBOUNCE_S, TrainerSignals

    previous = signal.getsignal(signal.SIGINT)
    signals = TrainerSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same keypress delivered again (torchrun forwards it)
        time.sleep(0.05)
        assert signals.stop_signal == signal.SIGINT and signals.agree().stop
        time.sleep(INTERRUPT_DEBOUNCE_S + 0.1)
        with pytest.raises(Aborted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        signals.uninstall()
        signal.signal(signal.SIGINT, previous)


def test_a_checkpoint_from_before_a_key_existed_resumes_unless_the_key_is_set(tmp_path):
    """The stored config of an older version lacks the newer sections: those count as their defaults."""
    older = yaml.safe_load(dump_yaml(load_config("tiny")))
    del older["early_stop"]
    del older["deepspeed"]["offload_optimizer"]
    stored = yaml.safe_dump(older)
    assert check_resume_config(stored, load_config("tiny"), tmp_path) == []
    with pytest.raises(ConfigError, match=r"early_stop.eta: 2 -> 3"):
        check_resume_config(stored, load_config("tiny", ["early_stop.eta=3"]), tmp_path)


@pytest.mark.parametrize("junk", [b"", b"\xff\xfe", b"[1, 2]", b'{"host": "x"}'])
def test_damaged_lock_file_is_taken_over_instead_of_waited_on_forever(tmp_path, capsys, junk):
    """trainer.lock is read back by every start: one that is no record (a kill between its creation and its first
    write) made the next trainer wait forever, "being written this instant"."""
    import os
    import time

    path = tmp_path / "trainer.lock"
    path.write_bytes(junk)
    os.utime(path, (time.time() - 60, time.time() - 60))
    started = time.monotonic()
    RunDirLock(tmp_path).acquire().release()
    assert time.monotonic() - started < 5
    assert f"{path}: not a lock record (unchanged for 60 s): taking it over" in capsys.readouterr().err
