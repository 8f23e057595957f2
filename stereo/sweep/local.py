"""`sweep --local`: the trials one after another on this machine, each an ordinary `python -m stereo train` run.

Each trial's output goes to RUN_DIR/train.log and to this terminal. Ctrl-C (or SIGTERM) is passed to the running
trainer as SIGTERM: it checkpoints at the step in progress and exits 75; the sweep stops there, marks the trial
interrupted, and the next `sweep --local` resumes it from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from stereo.exitcodes import MEANING, OK, PREEMPTED
from stereo.sweep.book import COMPLETED, TRIAL_CONFIG, TrialRecord


def run_trials(records: list[TrialRecord], save: Callable[[], None], echo: bool = True) -> int:
    """Run each record's trial in turn, saving the records after every change; 0, or PREEMPTED when stopped."""
    for record in records:
        record.state, record.note = "running", ""
        save()
        print(f"sweep: trial {record.trial} ({' '.join(record.overrides)}) -> {record.run_dir}", file=sys.stderr,
              flush=True)
        code = run_trial(record, echo)
        record.state = {OK: COMPLETED, PREEMPTED: "interrupted"}.get(code, "failed")
        record.note = "" if code == OK else f"trainer exit {code}: {MEANING.get(code, 'killed by a signal')}"
        save()
        print(f"sweep: trial {record.trial} {record.state}" + (f" ({record.note})" if record.note else ""),
              file=sys.stderr, flush=True)
        if code == PREEMPTED:
            return PREEMPTED
    return OK


def run_trial(record: TrialRecord, echo: bool) -> int:
    """The trainer on the trial's saved config; the varied overrides are repeated on the command line (they change
    nothing) so that the wandb run is named after them."""
    run_dir = Path(record.run_dir)
    command = [sys.executable, "-m", "stereo", "train", str(run_dir / TRIAL_CONFIG), *record.overrides]
    # Its own session: a Ctrl-C reaches only us, and we decide how the trainer stops (SIGTERM: save and exit 75).
    env = {**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    previous = {sig: signal.signal(sig, lambda *_: proc.send_signal(signal.SIGTERM))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(run_dir / "train.log", "ab") as log:
            copier = threading.Thread(target=_copy, args=(proc.stdout, log, echo), daemon=True)
            copier.start()
            code = proc.wait()
            copier.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _free_port() -> int:
    """The trainer's process group (a world of one) listens on a port: a free one, not a guess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _copy(source, log, echo: bool) -> None:
    for chunk in iter(lambda: source.read1(65536), b""):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
