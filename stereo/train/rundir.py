"""The run directory: one trainer at a time (a lock with a heartbeat), and a resume only with a compatible config.

Lock: RUN_DIR/trainer.lock holds {host, boot id, pid, process start time, heartbeat}. Rank 0 creates it with
O_EXCL and rewrites the heartbeat every HEARTBEAT_S; a clean exit (any exit through stereo.train.failures) removes
it. A lock left by a dead holder is taken over: at once when the holder ran on this machine (its pid is gone or
belongs to another process), otherwise once its heartbeat has not moved for STALE_S (the node may have vanished;
a file lock would stay held by a dead NFS client, a heartbeat cannot).

Config: a resumed run must train what its checkpoint trained. The resolved config stored with the newest
checkpoint is compared key by key with the new one; keys in RESUMABLE may change (listed in the log), any other
change is refused with the list, unless train.allow_config_change is true (then recorded in metrics.jsonl).
RUN_DIR/config.yaml is the config of the current start and is written only after the check; every start's config
is kept as RUN_DIR/starts/start_NNN.yaml.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import yaml

from stereo.config import Config, dump_yaml
from stereo.config.errors import ConfigError
from stereo.train.failures import RunDirBusy

LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 5.0
STALE_S = 30.0
DAMAGED_S = 5.0  # a lock file that is no record this long is damaged (a holder writes its record at once)

# Keys a resume may change: how long to train and how to report, never what is trained or how (the starting
# weights only matter to a fresh start: a resume takes every weight from its checkpoint).
RESUMABLE = ("name", "train.steps", "train.val_every", "train.max_bad_steps", "train.allow_config_change",
             "train.run_dir", "train.cudnn_benchmark", "train.check_memory", "train.compile", "train.compile_cache",
             "train.compile_backend", "logging", "checkpoint", "slurm", "eval", "data.val", "data.val_samples",
             "model.valid_iters", "model.init_from", "model.pretrained")
# How the global batch is split over processes: may change when the global batch stays (stereo.train.elastic)
BATCH_SPLIT = ("train.grad_accum", "data.batch_size")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a pid apart from a later process that reuses it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                   "started": _start_time(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        watched: tuple[float, float] | None = None  # (heartbeat seen, when first seen) of a holder on another host
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written this instant, removed, or damaged
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age > DAMAGED_S:  # a kill between its creation and its first write, a stray write
                        print(f"{self.path}: not a lock record (unchanged for {age:.0f} s): taking it over",
                              file=sys.stderr, flush=True)
                        self._take_over()
                        continue
                    time.sleep(0.2)
                    continue
                verdict = self._holder_alive(holder)
                if verdict is None and time.time() - float(holder.get("heartbeat", 0)) > 2 * STALE_S:
                    verdict = False  # silent for long by the clocks of both machines
                if verdict is None:  # on another machine: alive while its heartbeat moves
                    if watched is None or watched[0] != holder.get("heartbeat"):
                        if watched is not None:
                            verdict = True
                        watched = (holder.get("heartbeat"), time.monotonic())
                    elif time.monotonic() - watched[1] > STALE_S:
                        verdict = False
                if verdict is True:
                    raise RunDirBusy(f"{self.path.parent}: another trainer is using this run directory (pid "
                                     f"{holder.get('pid')} on {holder.get('host')}, lock {self.path}); stop it first "
                                     "or choose another train.run_dir")
                if verdict is False:
                    self._take_over()
                    continue
                time.sleep(1.0)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self.me, "heartbeat": time.time()}))
            break
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-dir-heartbeat")
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:  # a run directory made read-only: the next trainer takes the dead lock over
                print(f"could not remove the lock {self.path} ({exc.strerror}); the next trainer takes it over once "
                      "this process is gone", file=sys.stderr, flush=True)

    def _read(self) -> dict | None:
        """The holder's record; None while it is being written or removed, or when it is not one (damaged: such a
        lock is taken over once it has not changed for STALE_S, as a silent holder's)."""
        try:
            holder = json.loads(self.path.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            return None
        return holder

    def _holder_alive(self, holder: dict) -> bool | None:
        if holder.get("host") != self.me["host"] or holder.get("boot_id") != self.me["boot_id"]:
            return None
        return _start_time(int(holder["pid"])) == holder.get("started")

    def _take_over(self) -> None:
        # a rename succeeds for exactly one of several trainers taking over the same stale lock
        stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
            try:
                tmp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a full disk must not kill the trainer here; the checkpoint save reports it


def live_holder(run_dir: Path) -> dict | None:
    """The trainer holding the run directory's lock, if it is alive (on this machine: its process; elsewhere: a
    heartbeat newer than STALE_S); None when the directory is free or its lock is stale."""
    lock = RunDirLock(run_dir)
    holder = lock._read()
    if holder is None:
        return None
    alive = lock._holder_alive(holder)
    if alive is None:
        alive = time.time() - float(holder.get("heartbeat", 0)) < STALE_S
    return holder if alive else None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def config_changes(stored_yaml: str, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, stored value, new value) for every key that differs. A key the stored config lacks (written before the
    key existed) counts as its default: a checkpoint of an older version resumes unless the new key is set."""
    defaults = flatten(yaml.safe_load(dump_yaml(Config())))
    old = {**defaults, **flatten(yaml.safe_load(stored_yaml) or {})}
    new = flatten(yaml.safe_load(dump_yaml(cfg)))
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def is_resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE)


def check_resume_config(stored_yaml: str | None, cfg: Config, where: Path, same_global_batch: bool = False,
                        ) -> list[tuple[str, object, object]]:
    """The changes against the stored config; raises ConfigError for refused ones. `same_global_batch`: the
    checkpoint's global batch equals this start's (then its split, BATCH_SPLIT, may change)."""
    if stored_yaml is None:
        return []
    changes = config_changes(stored_yaml, cfg)
    refused = [c for c in changes if not is_resumable(c[0]) and not (same_global_batch and c[0] in BATCH_SPLIT)]
    if refused and not cfg.train.allow_config_change:
        listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError("train.allow_config_change",
                          f"the same config as the checkpoint being resumed ({where}), but {len(refused)} key(s) "
                          f"differ: {listing}. Keys that may change on resume: {', '.join(RESUMABLE)}. Set "
                          "train.allow_config_change=true to resume anyway, or use a new train.run_dir")
    return changes


def record_start(run_dir: Path, cfg: Config) -> int:
    """Write this start's config (RUN_DIR/config.yaml and starts/start_NNN.yaml); returns the start number."""
    starts = run_dir / "starts"
    starts.mkdir(parents=True, exist_ok=True)
    number = len(list(starts.glob("start_*.yaml"))) + 1
    text = dump_yaml(cfg)
    (starts / f"start_{number:03d}.yaml").write_text(text)
    (run_dir / "config.yaml").write_text(text)
    return number
