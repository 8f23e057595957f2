"""Atomic, verified, rotating checkpoints: DeepSpeed's own files plus our per-rank trainer state.

Layout under RUN_DIR/checkpoints/:
  step_NNNNNNNN.tmp/   being written by every rank (DeepSpeed files in ds/, trainer_state_rank{r}.pt, config.yaml,
                       layout.json: the world size and batch split it was written with)
  step_NNNNNNNN/       renamed by rank 0 after every rank wrote; complete only once COMPLETE exists (written last)
  latest               text: the newest complete directory name (a convenience; loading scans for COMPLETE)
COMPLETE is a JSON manifest: the size and xxh3-64 checksum of every file, hashed by the ranks in parallel at save
and checked again before a resume, so a truncated or damaged file is named and the next older checkpoint is used.
A directory without COMPLETE is never loaded and is removed by the next save, so a crash or kill -9 at any moment
leaves the previous checkpoint loadable. A save that fails (disk full, permission) names the path and the cause,
removes its partial directory and raises CheckpointError; the previous checkpoint stays the newest.
A checkpoint of another world size is loaded through stereo.train.elastic (DeepSpeed's universal format, written
to universal/ beside the checkpoints and removed once loaded).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stereo.train import elastic
from stereo.train.run_files import LATEST, STEP_DIR, read_latest

COMPLETE = "COMPLETE"
DS_TAG = "ds"
CONFIG_FILE = "config.yaml"  # the resolved config the checkpoint was trained with (compared on resume)
UNIVERSAL_DIR = "universal"  # under checkpoints/: a checkpoint of another world size, converted for loading
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """No checkpoint could be loaded, or a save failed; the message names the file and the cause."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_path(step_dir: Path, rank: int) -> Path:
    return step_dir / f"trainer_state_rank{rank}.pt"


def complete_steps(root: Path) -> list[int]:
    """Steps with a committed checkpoint, oldest first."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The newest complete checkpoint of a run (or the one at `step`), verified; a clear error when there is none."""
    root = Path(run_dir) / "checkpoints"
    steps = complete_steps(root)
    if not steps:
        raise FileNotFoundError(f"{root}: no complete checkpoint (a step_NNNNNNNN directory with {COMPLETE})")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{root}: no complete checkpoint at step {step} (have {steps})")
    step_dir = root / step_dir_name(steps[-1] if step is None else step)
    problem = check_files(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
    return step_dir


# ---- manifest: sizes and checksums ---------------------------------------------------------------------------------

def file_digest(path: Path) -> list:
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return [path.stat().st_size, digest.hexdigest()]


def list_manifest(step_dir: Path) -> dict[str, list] | None:
    """{relative path: [size, xxh3]} from COMPLETE; None for a checkpoint written before manifests existed (its
    COMPLETE holds the step number). Raises ValueError naming the file when COMPLETE is anything else: empty (what
    a crash can leave), cut short, unreadable. Such a checkpoint is damaged, never taken for the older format,
    which would turn the checksum check off."""
    path = step_dir / COMPLETE
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if text.strip().isdigit():
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not record["files"]:
        shown = f"{len(text.encode())} bytes" if text.strip() else "empty"
        raise ValueError(f"{path}: damaged manifest ({shown}; expected the JSON list of the checkpoint's files)")
    return record["files"]


def check_files(step_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """The first problem with the manifest or with this rank's share of the files it lists, or None."""
    try:
        files = list_manifest(step_dir)
    except ValueError as exc:
        return str(exc)
    return verify_files(step_dir, files, share)


def verify_files(step_dir: Path, files: dict[str, list] | None, share: tuple[int, int] = (0, 1)) -> str | None:
    """The first problem among this rank's share (index % world == rank) of the manifest's files, or None."""
    if files is None:
        return None if (step_dir / DS_TAG).is_dir() else f"{step_dir / DS_TAG}: missing"
    rank, world = share
    for i, (name, (size, checksum)) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        path = step_dir / name
        if not path.is_file():
            return f"{path}: missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path}: {actual} bytes, expected {size} (truncated or overwritten)"
        if file_digest(path)[1] != checksum:
            return f"{path}: checksum {file_digest(path)[1]} differs from the recorded {checksum} (damaged)"
    return None


# ---- collectives that tolerate one rank failing ----------------------------------------------------------------------

def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _first_problem(problem: str | None) -> str | None:
    """Every rank learns the first problem any rank had (doubles as a barrier)."""
    if not dist.is_initialized():
        return problem
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def describe_write_error(path: Path, exc: BaseException) -> str:
    """torch.save reports a full disk as `basic_ios::clear: iostream error`; say what really happened."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return "read-only file system (the run directory was made read-only)"
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc})"
    existing = next(p for p in [path, *path.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < 64 << 20:
        return f"no space left on device ({free >> 20} MiB free; {type(exc).__name__}: {exc})"
    if not os.access(existing, os.W_OK):
        return f"permission denied on {existing} ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, keep_every: int | None, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.keep_every, self.rank = keep_last, keep_every, rank

    def latest(self) -> Path | None:
        steps = complete_steps(self.root)
        return self.root / step_dir_name(steps[-1]) if steps else None

    # ---- save ------------------------------------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict, config_yaml: str,
             layout: elastic.Layout | None = None) -> Path:
        """Collective: every rank calls it at the same step. Raises CheckpointError on every rank if any rank's
        write failed; the partial directory is removed and the previous checkpoint stays the newest."""
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        problem = None
        if self.rank == 0:
            try:
                self._remove_incomplete()
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / DS_TAG).mkdir(parents=True)
                _fsync_write(tmp / CONFIG_FILE, config_yaml)
                if layout is not None:
                    _fsync_write(tmp / elastic.LAYOUT_FILE, layout.to_json())
            except OSError as exc:
                problem = f"{tmp}: {describe_write_error(tmp, exc)}"
        problem = _first_problem(problem)
        if problem is None:
            problem = self._write_rank_files(engine, tmp, trainer_state)
        if problem is None:
            problem = _first_problem(self._commit(tmp, final, step))
        if problem is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest()
            raise CheckpointError(f"checkpoint save at step {step} failed: {problem}. The partial save was removed; "
                                  f"{f'the previous checkpoint {kept} is intact' if kept else 'no earlier checkpoint'}")
        return final

    def _write_rank_files(self, engine, tmp: Path, trainer_state: dict) -> str | None:
        problem = None
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        except (OSError, RuntimeError) as exc:
            # A write failed between DeepSpeed's opening and closing barriers: join the closing one, in which the
            # ranks whose writes succeeded are waiting.
            problem = f"{tmp / DS_TAG}: {describe_write_error(tmp, exc)}"
            _barrier()
        if problem is None:
            path = trainer_state_path(tmp, self.rank)
            try:
                torch.save(trainer_state, path)
            except (OSError, RuntimeError) as exc:
                problem = f"{path}: {describe_write_error(path, exc)}"
        return _first_problem(problem)

    def _commit(self, tmp: Path, final: Path, step: int) -> str | None:
        """Hash this rank's share of the files, then rank 0 renames and writes the manifest last."""
        rank, world = _world()
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        mine = {name: file_digest(tmp / name) for i, name in enumerate(names) if i % world == rank}
        if dist.is_initialized():
            shares: list = [None] * world
            dist.all_gather_object(shares, mine)
            files = {k: v for share in shares for k, v in share.items()}
        else:
            files = mine
        if self.rank != 0:
            return None
        try:
            shutil.rmtree(final, ignore_errors=True)  # an uncommitted leftover of an earlier attempt
            os.replace(tmp, final)
            _fsync_write(final / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")
        except OSError as exc:
            shutil.rmtree(final, ignore_errors=True)
            return f"{final}: {describe_write_error(final, exc)}"
        self.tidy()
        return None

    def tidy(self) -> None:
        """Rank 0: `latest` names the newest complete checkpoint, no stray files, rotation applied (also at start-up,
        after a kill between the commit and the rotation)."""
        (self.root / "latest.writing").unlink(missing_ok=True)
        steps = complete_steps(self.root)
        if not steps:
            return
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                # un-commit first, so that a kill during the removal cannot leave a half-deleted "complete" one
                (self.root / step_dir_name(step) / COMPLETE).unlink()
                shutil.rmtree(self.root / step_dir_name(step))
        if read_latest(self.root) != step_dir_name(steps[-1]):  # also rewrites a damaged pointer
            _fsync_write(self.root / LATEST, step_dir_name(steps[-1]) + "\n")

    def _remove_incomplete(self) -> None:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith("step_") and entry.is_dir() and not (entry / COMPLETE).is_file():
                shutil.rmtree(entry, ignore_errors=True)

    # ---- load ------------------------------------------------------------------------------------------------------

    def resume(self, engine, seed: int = 0, ema=None) -> tuple[Path, dict] | None:
        """Collective. Load the newest checkpoint whose files verify and load, falling back to older ones (saying
        why); None when the run has no checkpoint. One of another world size is moved to this one (the EMA's
        partitions re-split, new ranks' RNG states derived from `seed`). Raises CheckpointError when checkpoints exist but none loads."""
        failures = []
        for step in reversed(complete_steps(self.root)):
            step_dir = self.root / step_dir_name(step)
            problem = _first_problem(check_files(step_dir, _world()))
            state = None
            if problem is None:
                state, problem = self._load(engine, step_dir, seed, ema)
                problem = _first_problem(problem)
            if problem is None:
                if failures and self.rank == 0:
                    print(f"resuming from the older checkpoint {step_dir} instead", file=sys.stderr, flush=True)
                return step_dir, state
            failures.append(f"{step_dir.name}: {problem}")
            if self.rank == 0:
                print(f"checkpoint {step_dir} is unusable: {problem}; trying the previous one", file=sys.stderr,
                      flush=True)
            if "size mismatch" in problem:  # older checkpoints have the same shapes: no point in trying them
                break
        if failures:
            raise CheckpointError(f"{self.root}: no usable checkpoint ({'; '.join(failures)}). Nothing was deleted; "
                                  "move the damaged directories away to start afresh")
        return None

    def _load(self, engine, step_dir: Path, seed: int, ema) -> tuple[dict | None, str | None]:
        """(this rank's trainer state, None) or (None, what failed)."""
        saved = elastic.read_layout(step_dir)
        if saved is not None and saved.world_size != _world()[1]:
            return self._load_moved(engine, step_dir, saved.world_size, seed, ema)
        state_file = trainer_state_path(step_dir, self.rank)
        if not state_file.is_file():
            return None, f"{state_file}: missing (saved with a different number of processes?)"
        try:
            path, _ = engine.load_checkpoint(str(step_dir), tag=DS_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                return None, f"{step_dir / DS_TAG}: DeepSpeed found no checkpoint there"
            return torch.load(state_file, map_location="cpu", weights_only=False), None
        except Exception as exc:  # noqa: BLE001 - any failure names the checkpoint, and an older one is tried
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if "size mismatch" in str(exc):
                return None, (f"{step_dir / DS_TAG}: size mismatch: the checkpoint's weights do not fit this model "
                              f"(was model.* changed?): {first_line}")
            return None, f"{step_dir / DS_TAG}: {type(exc).__name__}: {first_line}"


    def _load_moved(self, engine, step_dir: Path, saved_world: int, seed: int, ema) -> tuple[dict | None, str | None]:
        """A checkpoint of `saved_world` processes into this world (stereo.train.elastic). Collective."""
        ds_dir, load_dir, problem = step_dir / DS_TAG, step_dir, None
        partitioned = elastic.has_partitioned_optimizer(ds_dir)
        if self.rank == 0:
            how = (f"converting it to DeepSpeed's universal format in {self.root / UNIVERSAL_DIR / step_dir.name}"
                   if partitioned else "its optimizer state is not partitioned and loads as it is")
            print(f"{step_dir}: written by {saved_world} processes, resuming with {_world()[1]}: {how}",
                  file=sys.stderr, flush=True)
        if partitioned:
            load_dir = self.root / UNIVERSAL_DIR / step_dir.name
            if self.rank == 0:
                try:
                    elastic.to_universal(ds_dir, load_dir / DS_TAG)
                except Exception as exc:  # noqa: BLE001 - named, and an older checkpoint is tried
                    problem = f"{ds_dir}: conversion to a universal checkpoint failed: {type(exc).__name__}: {exc}"
            problem = _first_problem(problem)
        try:
            if problem is None:
                states = []
                for rank in range(saved_world):
                    path = trainer_state_path(step_dir, rank)
                    if not path.is_file():
                        return None, f"{path}: missing (the checkpoint's layout says {saved_world} processes)"
                    # mapped, not read: every rank's state holds an EMA, and below ZeRO-3 only rank 0's is used
                    states.append(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
                with elastic.universal_loading(engine) if partitioned else contextlib.nullcontext():
                    path, _ = engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
                if path is None:
                    return None, f"{load_dir / DS_TAG}: DeepSpeed found no checkpoint there"
                if partitioned:
                    elastic.restore_outside_optimizer(engine, step_dir, DS_TAG)
                restore_loss_scale(engine, states[0].get("loss_scale"))
                return elastic.merge_trainer_states(states, self.rank, _world()[1], ema, seed), None
        except Exception as exc:  # noqa: BLE001 - as in _load
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problem = f"{load_dir / DS_TAG}: {type(exc).__name__}: {first_line}"
        finally:
            _barrier()
            if partitioned and self.rank == 0:
                shutil.rmtree(self.root / UNIVERSAL_DIR, ignore_errors=True)
        return None, problem


def restore_loss_scale(engine, scale: float | None) -> None:
    """fp16's dynamic loss scale, which the universal format does not carry (bf16 and fp32 have none)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scale is not None and scaler is not None and getattr(scaler, "dynamic", False):
        scaler.cur_scale = scale


def _fsync_write(path: Path, text: str) -> None:
    """Atomic: the file has its old content or all of the new, also after a power cut (the rename is made durable
    by the directory's fsync)."""
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
