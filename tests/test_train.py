"""End to end through torchrun and real DeepSpeed on the demo shards (CPU, gloo): exact resume after kill -9 at
world size 1 and 2, NaN steps skipped on every rank, too many bad steps stop the run, the signal contract, wandb
offline with one run id across a resume, and the API key never written anywhere.

Runs are small (64x128 crops, 2 GRU iterations, 8 steps) and shared between assertions (module-scoped fixtures).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port
from stereo.train.checkpoint import complete_steps, find_checkpoint
from stereo.exitcodes import PREEMPTED as EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
POISONED_TRAIN = str(REPO / "tests" / "poisoned_train.py")
pytestmark = pytest.mark.usefixtures("demo_shards")
FAST = ["augment.crop=[64,128]", "data.batch_size=1", "model.train_iters=2", "model.valid_iters=2",
        "train.steps=8", "checkpoint.every=3", "checkpoint.keep_last=2", "logging.every=1", "logging.image_every=4",
        "train.val_every=1000", "data.val=[]", "logging.wandb=disabled", "schedule.warmup_steps=2",
        "deepspeed.zero_stage=1"]


def launch(run_dir: Path, nproc: int = 1, overrides: tuple[str, ...] = (), env: dict | None = None,
           poison: tuple[str, ...] = ()) -> subprocess.Popen:
    """`poison`: the options of tests/poisoned_train.py (NaN losses at given steps), which then runs the trainer."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    entry = [POISONED_TRAIN, *poison] if poison else ["-m", "stereo"]
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *entry, "train", "tiny",
           f"train.run_dir={run_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, (run_dir.parent / f"{run_dir.name}.log").read_text()


def run(run_dir: Path, nproc: int = 1, overrides: tuple[str, ...] = (), env: dict | None = None) -> tuple[int, str]:
    return finish(launch(run_dir, nproc, overrides, env), run_dir)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 of torchrun and every process under it (torchrun starts each worker in its own session)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step") == step and "loss" in r for r in metrics(run_dir)):
            return
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def final_weights(run_dir: Path) -> tuple[dict, dict]:
    step_dir = find_checkpoint(run_dir)
    module = torch.load(step_dir / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    trainer = torch.load(step_dir / "trainer_state_rank0.pt", map_location="cpu", weights_only=False)
    return module["module"], trainer["ema"]["shadow"]


def assert_bit_identical(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == list(range(1, 9)), la
    assert la == lb  # exact float equality, every step
    (wa, ea), (wb, eb) = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def resumed_pair(nproc: int, root: Path, overrides: tuple[str, ...] = ()) -> tuple[Path, Path, str]:
    """(straight run, run killed with -9 during step 6 and restarted on the same directory, restart log)."""
    wandb = ("logging.wandb=offline",) if nproc == 1 else ()
    straight, killed = root / "straight", root / "killed"
    code, log = run(straight, nproc, overrides)
    assert code == 0, log[-3000:]
    second = launch(killed, nproc, (*overrides, *wandb))
    wait_for_step(killed, 5, second)  # the kill lands during step 6, after the checkpoint at step 3
    kill_tree(second)
    assert complete_steps(killed / "checkpoints") == [3]
    code, log = run(killed, nproc, (*overrides, *wandb))
    assert code == 0, log[-3000:]
    return straight, killed, log


@pytest.fixture(scope="module")
def pair1(tmp_path_factory):
    return resumed_pair(1, tmp_path_factory.mktemp("world1"))


@pytest.fixture(scope="module")
def pair2(tmp_path_factory):
    return resumed_pair(2, tmp_path_factory.mktemp("world2"))


@pytest.mark.parametrize("pair", ["pair1", "pair2"])
def test_kill9_and_restart_is_bit_identical(pair, request):
    straight, killed, log = request.getfixturevalue(pair)
    assert "resumed at step 3 from" in log and "step_00000003" in log
    assert_bit_identical(straight, killed)
    assert complete_steps(killed / "checkpoints") == [6, 8]  # keep_last=2
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_offloaded_optimizer_trains_and_resumes_bit_identically(pair1, tmp_path):
    """ZeRO-2 with the optimizer in host memory (torch's fused CPU AdamW on the fp32 partitions): DeepSpeed refuses a
    client optimizer there unless told, so this once failed at start. Same losses as the ZeRO-1 run on the device
    (the first step exactly: no update yet), and kill -9 resume is exact."""
    straight, killed, log = resumed_pair(1, tmp_path, ("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"))
    assert "resumed at step 3 from" in log
    assert_bit_identical(straight, killed)
    on_device, offloaded = losses(pair1[0]), losses(straight)
    assert offloaded[1] == on_device[1]
    assert offloaded[2] == pytest.approx(on_device[2], rel=1e-3) and offloaded[2] != offloaded[1]


def test_run_directory_layout(pair1):
    straight, _, _ = pair1
    assert (straight / "config.yaml").is_file()
    assert list((straight / "images").glob("*.png")), "an image every logging.image_every steps"
    first = next(r for r in metrics(straight) if "loss" in r)
    for key in ("loss", "loss/init", "loss/seq", "lr", "grad_norm", "samples_per_s", "data_wait_s", "skipped_steps",
                "time", "step"):
        assert key in first, key


def test_wandb_offline_keeps_one_run_id_across_resume(pair1):
    straight, killed, _ = pair1
    run_id = (killed / "wandb_id").read_text().strip()
    runs = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the killed attempt and the restart
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    assert not (straight / "wandb").exists()  # logging.wandb=disabled writes nothing


def worker_pid(proc: subprocess.Popen, rank: int) -> int:
    """The torchrun worker of `rank` (read from its environment)."""
    for pid in descendants(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise LookupError(f"no worker with RANK={rank} under {proc.pid}")


@pytest.fixture(scope="module")
def nan_then_signal(tmp_path_factory):
    """World 2: rank 1's loss is NaN at step 2; later rank 1 alone gets SIGUSR1."""
    run_dir = tmp_path_factory.mktemp("nan_signal") / "run"
    proc = launch(run_dir, 2, ("train.steps=50", "checkpoint.every=100"), poison=("--nan-steps", "2", "--nan-rank", "1"))
    wait_for_step(run_dir, 3, proc)
    os.kill(worker_pid(proc, 1), signal.SIGUSR1)
    code, log = finish(proc, run_dir)
    return run_dir, code, log


def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(nan_then_signal):
    run_dir, _, log = nan_then_signal
    assert "[rank 0] skipped step 2: non-finite loss" in log
    assert "[rank 1] skipped step 2: non-finite loss" in log
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in records[:3]] == [0, 1, 1]
    assert all(r["loss"] == r["loss"] for r in records)  # the poisoned loss never reached the log or the weights
    state = torch.load(find_checkpoint(run_dir) / "trainer_state_rank1.pt", weights_only=False)
    assert state["skipped_at"] == [2] and state["skipped_steps"] == 1


def test_signal_on_one_rank_checkpoints_all_and_exits_75(nan_then_signal):
    run_dir, code, log = nan_then_signal
    assert code != 0
    assert f"exitcode  : {EXIT_PREEMPTED}" in log  # torchrun reports the workers' code
    saved = complete_steps(run_dir / "checkpoints")
    assert len(saved) == 1 and 3 <= saved[0] < 50
    for rank in (0, 1):
        assert f"[rank {rank}] stopped by a signal: checkpointed at step {saved[0]}" in log
    assert f"to resume: make resume RUN={run_dir}" in log
    assert max(r["step"] for r in metrics(run_dir)) == saved[0]


def test_too_many_bad_steps_stop_and_keep_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, POISONED_TRAIN, "--nan-steps", "2,2,2", "train", "tiny", f"train.run_dir={run_dir}", *FAST,
           "checkpoint.every=1", "train.max_bad_steps=3"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "3 non-finite steps in a row at step 2" in result.stderr
    assert complete_steps(run_dir / "checkpoints") == [1]


def test_api_key_never_written(tmp_path):
    """An online-capable key in the environment, offline mode: the key appears in no file of the run."""
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_dir = tmp_path / "run"
    code, log = run(run_dir, 1, ("train.steps=1", "checkpoint.every=1", "logging.wandb=offline"),
                    env={"WANDB_API_KEY": secret})
    assert code == 0, log[-3000:]
    assert (run_dir / "wandb").is_dir()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in log


@pytest.fixture(scope="module")
def zero_stages(tmp_path_factory):
    """The same 2-step run at ZeRO-1 and ZeRO-3 (world size 2) with the EMA and validation. Adam's eps is raised so
    that the stages' float-level gradient differences (other reduction orders) cannot flip the sign of an update."""
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (1, 3):
        runs[stage] = root / f"zero{stage}"
        code, log = run(runs[stage], 2, (f"deepspeed.zero_stage={stage}", "train.steps=2", "checkpoint.every=2",
                                         "optim.eps=1e-2", "train.val_every=2", "data.val_samples=2",
                                         "data.val=[{name: demo_val, shards: shards/demo/val}]"))
        assert code == 0, log[-3000:]
    return runs


def test_zero3_keeps_a_sharded_ema_that_validates_and_exports(zero_stages):
    from stereo.config import load_config
    from stereo.model import build_model
    from stereo.train.export import load_checkpoint_weights

    shard = torch.load(find_checkpoint(zero_stages[3]) / "trainer_state_rank1.pt", weights_only=False)["ema"]
    whole = torch.load(find_checkpoint(zero_stages[1]) / "trainer_state_rank0.pt", weights_only=False)["ema"]
    assert shard["partitioned"] and not whole["partitioned"]
    assert sum(t.numel() for t in shard["shadow"].values()) < 0.6 * sum(t.numel() for t in whole["shadow"].values())

    weights = {}
    for stage, run_dir in zero_stages.items():
        for use_ema in (False, True):
            model = build_model(load_config(run_dir / "config.yaml").model)
            load_checkpoint_weights(model, find_checkpoint(run_dir), use_ema)  # what `export` writes
            weights[stage, use_ema] = model.state_dict()
    # float-level differences grow in the second step (BatchNorm on single 64x128 crops is ill-conditioned); the EMA,
    # 98 % the starting weights, stays closer
    for use_ema, atol in ((False, 2e-4), (True, 1e-5)):
        for key, value in weights[1, use_ema].items():
            torch.testing.assert_close(weights[3, use_ema][key], value, rtol=1e-3, atol=atol, msg=key)
    assert any(not torch.allclose(weights[3, True][k], weights[3, False][k]) for k in weights[3, True])

    # validation put the EMA into ZeRO-3's partitions on every rank, the small parameters that ZeRO-3 keeps gathered
    # included: the logged EPE is the exported EMA weights' EPE, not the live ones' (nor a mixture)
    from stereo.data.loader import iter_val_samples
    from stereo.eval.runner import evaluate

    cfg = load_config(zero_stages[3] / "config.yaml")
    offline = {}
    for use_ema in (False, True):
        model = build_model(cfg.model).eval()
        model.load_state_dict(weights[3, use_ema])
        offline[use_ema] = evaluate(model, iter_val_samples(cfg.data), cfg.model.valid_iters, "cpu",
                                    max_disp=cfg.model.max_disp, progress=False)["epe/pooled"]
    logged = [m["val/epe/pooled"] for m in metrics(zero_stages[3]) if "val/epe/pooled" in m]
    assert abs(offline[True] - offline[False]) > 1e-4  # the check below can tell them apart
    assert len(logged) == 2 and logged[-1] == pytest.approx(offline[True], abs=1e-5)
