"""Sweeps (docs/sweeps.md): the sweep file, every trial validated before anything is queued, and, with the real
trainer, the shipped tiny sweep (`configs/sweeps/tiny.yaml`, 4 trials) made short: on the local Slurm cluster as
one job array with concurrency 2, one trial preempted (it requeues and ends bit-identical to the same trial run
uninterrupted with `LOCAL=1`), one cancelled and the sweep resumed (only that trial re-runs), ranked by `make
compare`; and the docs' three-command learning-rate sweep of `finetune_custom`.

The make commands run in a directory laid out like a checkout (Makefile, .venv, configs, shards, pretrained:
links and small files), so they run exactly as the docs write them and write nothing into the repository."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from jobs.state import FINAL_STATES, query
from stereo.config.errors import ConfigError
from stereo.sweep.spec import build_trials, load_sweep, parse_sweep
from test_jobs import wait_for
from test_slurm import cluster, final_weights  # noqa: F401 - the module-scoped local cluster fixture

REPO = Path(__file__).resolve().parents[1]
# The tiny trials: 8 steps of 64x128 crops, validation on one held-out image at steps 0, 4 and 8.
FAST = ["augment.crop=[64,128]", "data.batch_size=1", "data.num_workers=0", "data.val_samples=1",
        "model.train_iters=2", "model.valid_iters=2", "train.steps=8", "train.val_every=4", "checkpoint.every=4",
        "schedule.warmup_steps=1", "logging.every=1", "logging.image_every=0", "logging.wandb=disabled",
        "slurm.cpus_per_task=1", "slurm.mem_gb=2"]
TRIALS = ["t00", "t01", "t02", "t03"]


# --- the sweep file -------------------------------------------------------------------------------------------


def test_grid_crossed_with_seeded_draws():
    raw = {"config": "tiny", "grid": {"optim.lr": [1.0e-4, 1.0e-3], "model.freeze_bn": [True, False]},
           "random": {"seed": 3, "trials": 3, "keys": {"loss.gamma": {"uniform": [0.8, 0.95]},
                                                      "optim.weight_decay": {"log_uniform": [1.0e-6, 1.0e-2]},
                                                      "model.train_iters": {"uniform": [2, 6]},
                                                      "loss.seq_kind": {"choice": ["l1", "epe"]}}}}
    spec = parse_sweep(raw, "mine", "mine.yaml")
    trials = spec.trial_overrides()
    assert len(trials) == 2 * 2 * 3
    assert trials == parse_sweep(raw, "mine", "mine.yaml").trial_overrides()  # seeded: the same file, the same trials
    draws = [t[2:] for t in trials[:3]]
    assert all(t[2:] == draws[i % 3] for i, t in enumerate(trials))  # every grid point sees the same draws
    assert [t[:2] for t in trials[::3]] == [["optim.lr=0.0001", "model.freeze_bn=true"],
                                            ["optim.lr=0.0001", "model.freeze_bn=false"],
                                            ["optim.lr=0.001", "model.freeze_bn=true"],
                                            ["optim.lr=0.001", "model.freeze_bn=false"]]
    values = [dict(o.split("=", 1) for o in d) for d in draws]
    for v in values:
        assert 0.8 <= float(v["loss.gamma"]) <= 0.95 and len(v["loss.gamma"].rstrip("0")) <= 5  # 3 digits
        assert 1e-6 <= float(v["optim.weight_decay"]) <= 1e-2
        assert v["model.train_iters"] in {"2", "3", "4", "5", "6"}  # integer bounds: integers
        assert v["loss.seq_kind"] in {"l1", "epe"}
    assert len({tuple(d) for d in draws}) == 3
    reseeded = parse_sweep({**raw, "random": {**raw["random"], "seed": 4}}, "mine", "mine.yaml")
    assert reseeded.trial_overrides() != trials
    assert parse_sweep(spec.to_raw(), "other", "x") == spec.__class__(**{**vars(spec), "source": "x"})
    nested = parse_sweep({**raw, "overrides": {"train": {"steps": 5}, "slurm.extra_sbatch": {"qos": "low"}}}, "m", "m")
    assert nested.fixed_overrides() == ["train.steps=5", "slurm.extra_sbatch.qos=low"]


@pytest.mark.parametrize("change, key, expected", [
    ({"grid": {"optim.lr": []}}, "grid.optim.lr", "a non-empty list"),
    ({"grid": {}}, "grid", "at least one key to vary"),
    ({"random": {"trials": 2, "keys": {"loss.gamma": {"log_uniform": [0, 1]}}}},
     "random.keys.loss.gamma.log_uniform", "low < high > 0"),
    ({"random": {"trials": 2, "keys": {"loss.gamma": {"normal": [0, 1]}}}}, "random.keys.loss.gamma", "one of"),
    ({"random": {"trials": 0, "keys": {"loss.gamma": {"uniform": [0, 1]}}}}, "random.trials", ">= 1"),
    ({"random": {"trials": 2, "keys": {"optim.lr": {"uniform": [0, 1]}}}}, "random.keys.optim.lr", "not also"),
    ({"max_concurent": 2}, "max_concurent", "unknown key"),
    ({"direction": "down"}, "direction", "min or max"),
    ({"overrides": {"optim.lr": 1.0}}, "overrides.optim.lr", "no trial varies"),
    ({"early_stop": {"rungs": [4], "keep": 2}}, "early_stop.keep", "unknown key"),
    ({"early_stop": {"eta": 2}}, "early_stop.rungs", "the steps where trials are compared"),
    ({"metric": "loss", "early_stop": {"rungs": [4]}}, "metric", "a validation metric"),
])
def test_bad_sweep_file_names_the_key(tmp_path, change, key, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": "tiny", "grid": {"optim.lr": [1.0e-3]}, **change}))
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    assert info.value.key == key and expected in str(info.value) and str(path) in str(info.value)


def test_a_bad_trial_stops_everything_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("config: tiny\ngrid:\n  optim.lr: [1.0e-3]\n"
                                       "  model.hidden_dims: [[16, 32, 16], [16, 16, 16]]\n")
    done = subprocess.run([sys.executable, "-m", "stereo", "sweep", str(tmp_path / "bad.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    # the trial, with its overrides, and the key: here from the model's own checks (built on the meta device)
    assert "sweep " + str(tmp_path / "bad.yaml") + ", trial t00 (optim.lr=0.001 model.hidden_dims=[16, 32, 16]): " \
           "model.hidden_dims: one width for all three levels" in done.stderr
    assert not (tmp_path / "runs").exists()
    monkeypatch.chdir(tmp_path)  # where shards/demo does not exist
    good_then_bad = parse_sweep({"config": "tiny", "grid": {"optim.lr": [1.0e-3, -1.0e-3]}}, "x", "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml, trial t00 \(optim.lr=0.001\): data.train\[0\].shards: readable"):
        build_trials(good_then_bad, tmp_path / "x")
    bad = parse_sweep({"config": "tiny", "grid": {"optim.lr": [-1.0e-3]}}, "x", "x.yaml")
    with pytest.raises(ConfigError, match=r"trial t00 \(optim.lr=-0.001\): optim.lr: > 0"):
        build_trials(bad, tmp_path / "x")


def test_array_tasks_side_by_side_get_their_own_rendezvous_ports():
    """Tasks of one array share SLURM_ARRAY_JOB_ID but not SLURM_JOB_ID; on one node each needs its own port."""
    from jobs.rendezvous import trainer_env

    def task(index: int) -> dict[str, str]:
        return {"SLURM_JOB_ID": str(4200 + index), "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": str(index),
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node01"}

    ports = {trainer_env(task(i))["MASTER_PORT"] for i in range(4)}
    assert len(ports) == 4
    assert trainer_env(task(2)) == trainer_env({**task(2), "SLURM_RESTART_COUNT": "1"})  # a requeue agrees


# --- a project directory: the commands run as the docs write them -----------------------------------------------


def project(root: Path, **files: Path) -> Path:
    """`root` laid out like a checkout: the Makefile, .venv, configs and demo shards linked from the repository,
    plus `files` (relative path -> a file or directory to link)."""
    root.mkdir(parents=True, exist_ok=True)
    links = {"Makefile": REPO / "Makefile", ".venv": REPO / ".venv", "configs": REPO / "configs",
             "shards/demo": REPO / "shards" / "demo", **{k.replace("__", "/"): v for k, v in files.items()}}
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target)
    return root


def make(cwd: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the jobs inherit both through sbatch
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def records(cwd: Path, name: str = "tiny") -> dict[str, dict]:
    lines = (cwd / "runs" / "sweeps" / name / "trials.jsonl").read_text().splitlines()
    return {r["trial"]: r for r in map(json.loads, lines)}


def metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def trained_steps(run_dir: str | Path) -> int:
    return max((r["step"] for r in metrics(run_dir) if "loss" in r), default=0)


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, demo_shards) -> dict:
    """The tiny sweep with LOCAL=1: the four trials one after another on this machine; Ctrl-C while t03 trains,
    then `make sweep` again to finish it. t00-t02 ran uninterrupted: the references of the Slurm trials."""
    cwd = project(tmp_path_factory.mktemp("local"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(cwd / "first.log", "w") as log:
        first = subprocess.Popen(["make", "--no-print-directory", "sweep", "SWEEP=configs/sweeps/tiny.yaml", "LOCAL=1",
                                  *FAST], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        t03 = cwd / "runs/sweeps/tiny/t03"
        wait_for(lambda: trained_steps(t03) >= 1 or first.poll() is not None, 1200, "t03 to train a step")
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: make and the sweep both get it
        first.wait(timeout=300)
        # the sweep prints its table once it let go of the sweep's lock
        wait_for(lambda: "| t03 |" in (cwd / "first.log").read_text(), 300, "the sweep to stop")
    interrupted = {"records": records(cwd), "trained": trained_steps(t03), "log": (cwd / "first.log").read_text()}
    done = make(cwd, "sweep", "SWEEP=configs/sweeps/tiny.yaml", "LOCAL=1", *FAST)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {"cwd": cwd, "interrupted": interrupted, "resumed": done}


@pytest.mark.slow
def test_local_sweep_runs_every_trial_with_the_same_bookkeeping(local_sweep):
    book = local_sweep["cwd"] / "runs" / "sweeps" / "tiny"
    trials = records(local_sweep["cwd"])
    assert list(trials) == TRIALS
    stored = yaml.safe_load((book / "sweep.yaml").read_text())
    assert stored["config"] == "tiny" and stored["overrides"]["train.steps"] == 8  # the command line, merged
    for trial in trials.values():
        assert trial["state"] == "completed" and trial["job_id"] is None
        run_dir = Path(trial["run_dir"])
        assert run_dir == book.resolve() / trial["trial"]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        varied = dict(o.split("=", 1) for o in trial["overrides"])
        assert config["optim"]["lr"] == float(varied["optim.lr"]) and config["loss"]["gamma"] == float(
            varied["loss.gamma"])
        assert config["logging"]["group"] == "tiny" and "sweep:tiny" in config["logging"]["tags"]
        assert "validation at step 8" in (run_dir / "train.log").read_text()
    assert {tuple(t["overrides"]) for t in trials.values()} == {tuple(o) for o in load_sweep(
        book / "sweep.yaml").trial_overrides()}


@pytest.mark.slow
def test_local_ctrl_c_checkpoints_the_trial_and_the_next_run_resumes_it(local_sweep):
    interrupted = local_sweep["interrupted"]
    assert "sweep: trial t03 interrupted (trainer exit 75" in interrupted["log"], interrupted["log"][-3000:]
    assert [r["state"] for r in interrupted["records"].values()] == ["completed"] * 3 + ["interrupted"]
    assert 1 <= interrupted["trained"] < 8
    assert "3 completed, 0 queued or running, 1 to run" in local_sweep["resumed"].stdout
    log = (Path(interrupted["records"]["t03"]["run_dir"]) / "train.log").read_text()
    assert "resumed at step " in log and f"from {interrupted['records']['t03']['run_dir']}/checkpoints/step_" in log
    assert "validation at step 8" in log


@pytest.mark.slow
def test_local_rerun_trains_nothing_twice_and_a_changed_sweep_is_refused(local_sweep):
    cwd = local_sweep["cwd"]
    before = {t: metrics(r["run_dir"]) for t, r in records(cwd).items()}
    again = make(cwd, "sweep", "SWEEP=configs/sweeps/tiny.yaml", "LOCAL=1", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 completed, 0 queued or running, 0 to run" in again.stdout
    # what next, once for the sweep (not each trial's single-run block)
    assert again.stdout.count("next: make compare SWEEP=configs/sweeps/tiny.yaml") == 1
    resumed = local_sweep["resumed"]
    assert "make export RUN=" not in resumed.stdout + resumed.stderr and "next: make compare SWEEP=" in resumed.stdout
    assert {t: metrics(r["run_dir"]) for t, r in records(cwd).items()} == before
    changed = make(cwd, "sweep", "SWEEP=configs/sweeps/tiny.yaml", "LOCAL=1", *FAST, "train.steps=9")
    assert changed.returncode == 2
    assert "the sweep as started in runs/sweeps/tiny/sweep.yaml" in changed.stderr and "8" in changed.stderr


@pytest.mark.slow
def test_early_stopping_stops_the_trials_behind_at_the_rung(tmp_path, demo_shards):
    """Successive halving with LOCAL=1: two learning rates, each twice (a one-value draw), so t01 repeats t00 exactly
    and must stop at the rung (an equal result ranks after the earlier one); every decision follows the rule."""
    cwd = project(tmp_path / "halving")
    (cwd / "halving.yaml").write_text(yaml.safe_dump({
        "config": "tiny", "grid": {"optim.lr": [5.0e-4, 2.0e-3]},
        "random": {"seed": 0, "trials": 2, "keys": {"loss.gamma": {"choice": [0.9]}}},
        "early_stop": {"rungs": [4], "eta": 2}}))
    done = make(cwd, "sweep", "SWEEP=halving.yaml", "LOCAL=1", *FAST)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rung = cwd / "runs/sweeps/halving/rungs/00000004"
    ledger = {path.stem: json.loads(path.read_text()) for path in rung.glob("*.json")}
    assert sorted(ledger) == TRIALS
    seen = []
    for trial in sorted(ledger, key=lambda t: ledger[t]["arrival"]):  # the rule, replayed in arrival order
        value = ledger[trial]["value"]
        seen.append(value)
        place = sum(v <= value for v in seen)  # equal earlier results rank first
        assert ledger[trial]["stop"] == (place > max(1, len(seen) // 2)), ledger
    assert ledger["t01"]["stop"] and ledger["t01"]["value"] == ledger["t00"]["value"]
    for trial, record in records(cwd, "halving").items():
        run_dir, stopped = Path(record["run_dir"]), ledger[trial]["stop"]
        last = 4 if stopped else 8
        assert record["state"] == "completed" and trained_steps(run_dir) == last
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
        assert ("stopped early at step 4: val/epe/pooled" in (run_dir / "train.log").read_text()) == stopped
    status = make(cwd, "sweep-status", "SWEEP=halving.yaml")
    assert "| t01 | optim.lr=0.0005 loss.gamma=0.9 | stopped early at step 4 | 4/8 |" in status.stdout, status.stdout


# --- on Slurm ------------------------------------------------------------------------------------------------


def running_tasks(array: str) -> int:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True).stdout
    return sum(line.startswith(f"{array}_") for line in out.split())


def task_state(job_id: str) -> str:
    return query(job_id).state or "UNKNOWN"


@pytest.fixture(scope="module")
def slurm_sweep(cluster, tmp_path_factory, demo_shards) -> dict:  # noqa: F811 - the imported fixture
    """The tiny sweep on Slurm: t01 preempted once it trained a step (a job of the higher `urgent` partition that
    needs all of t01's node: SIGTERM, the save, the batch shell's requeue; before issue 22 the array had no batch
    shell and a preempted trial ended FAILED), t02 cancelled while it runs, then the sweep resumed."""
    cwd = project(tmp_path_factory.mktemp("slurm"))
    done = make(cwd, "sweep", "SWEEP=configs/sweeps/tiny.yaml", *FAST)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    first = records(cwd)
    array = first["t00"]["job_id"].split("_")[0]
    seen = {"running": 0}

    def sampled(condition) -> bool:
        seen["running"] = max(seen["running"], running_tasks(array))
        return condition()

    wait_for(lambda: sampled(lambda: trained_steps(first["t01"]["run_dir"]) >= 1), 900, "t01 to train a step")
    node = subprocess.run(["squeue", "-h", "-j", first["t01"]["job_id"], "-o", "%N"], capture_output=True, text=True,
                          check=True).stdout.strip()
    cpus = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    preemptor = subprocess.run(["sbatch", "--parsable", "--partition=urgent", f"--nodelist={node}",
                                f"--cpus-per-task={cpus}", "--mem=100M", f"--output={cwd / 'urgent.out'}", "--wrap",
                                "sleep 2"], capture_output=True, text=True, check=True).stdout.strip()
    preempted_at = trained_steps(first["t01"]["run_dir"])
    wait_for(lambda: sampled(lambda: task_state(first["t02"]["job_id"]) == "RUNNING"), 900, "t02 to start")
    subprocess.run(["scancel", first["t02"]["job_id"]], check=True)
    wait_for(lambda: sampled(lambda: all(task_state(r["job_id"]) in FINAL_STATES for r in first.values())), 900,
             "every trial of the array to end")
    status = make(cwd, "sweep-status", "SWEEP=configs/sweeps/tiny.yaml")
    before = {t: metrics(r["run_dir"]) for t, r in first.items()}
    resumed = make(cwd, "sweep", "SWEEP=configs/sweeps/tiny.yaml", *FAST)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    second = records(cwd)
    wait_for(lambda: task_state(second["t02"]["job_id"]) in FINAL_STATES, 900, "t02 to end again")
    assert task_state(preemptor) == "COMPLETED"
    return {"cwd": cwd, "array": array, "first": first, "second": second, "status": status, "before": before,
            "resumed": resumed, "max_running": seen["running"], "preempted_at": preempted_at}


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_is_one_job_array_with_two_trials_at_a_time(slurm_sweep):
    first, array = slurm_sweep["first"], slurm_sweep["array"]
    assert [first[t]["job_id"] for t in TRIALS] == [f"{array}_{i}" for i in range(4)]
    script = (slurm_sweep["cwd"] / f"runs/sweeps/tiny/slurm/{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --job-name=tiny" in script
    assert 'scontrol requeue "$job" ||' in script  # the signal-safe batch shell of a single job
    assert slurm_sweep["max_running"] == 2  # t00 and t01 start together; never more
    trial = json.loads((Path(first["t01"]["run_dir"]) / "slurm_job.json").read_text())
    assert trial["job_id"] == first["t01"]["job_id"] and trial["wandb_name"] == "tiny " + " ".join(
        first["t01"]["overrides"])


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_trial_requeues_and_ends_bit_identical(slurm_sweep, local_sweep):
    t01 = slurm_sweep["second"]["t01"]
    assert t01["job_id"] == slurm_sweep["first"]["t01"]["job_id"] and t01["state"] == "completed"
    assert 1 <= slurm_sweep["preempted_at"] < 8, "t01 was not preempted mid-run"
    assert query(t01["job_id"]).restarts >= 1, "t01 was never requeued"
    log = (slurm_sweep["cwd"] / f"runs/sweeps/tiny/slurm/{t01['job_id']}_0_log.out").read_text()
    assert "start 2" in log and "trainer finished" in log
    assert "SIGTERM: asking the trainer to save" in log and "the trainer saved and exited" in log
    reference = records(local_sweep["cwd"])["t01"]
    assert reference["overrides"] == t01["overrides"]
    expected, got = final_weights(Path(reference["run_dir"])), final_weights(Path(t01["run_dir"]))
    assert expected.keys() == got.keys() and len(expected) > 100
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the LOCAL=1 run"


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_trial_alone_reruns_when_the_sweep_resumes(slurm_sweep, local_sweep):
    first, second = slurm_sweep["first"], slurm_sweep["second"]
    assert re.search(r"\| t02 \| \S+ \S+ \| cancelled \(log: runs/sweeps/tiny/slurm/\S+_2_0_log.out\)",
                     slurm_sweep["status"].stdout), slurm_sweep["status"].stdout
    assert "3 completed, 0 queued or running, 1 to run" in slurm_sweep["resumed"].stdout
    assert [t for t in TRIALS if second[t]["job_id"] != first[t]["job_id"]] == ["t02"]
    for trial in ("t00", "t01", "t03"):  # not trained again: their logs are as they were before the resume
        assert metrics(second[trial]["run_dir"]) == slurm_sweep["before"][trial]
    status = make(slurm_sweep["cwd"], "sweep-status", "SWEEP=configs/sweeps/tiny.yaml").stdout
    assert status.count("| completed | 8/8 |") == 4, status
    reference = records(local_sweep["cwd"])["t02"]
    expected, got = final_weights(Path(reference["run_dir"])), final_weights(Path(second["t02"]["run_dir"]))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slurm
@pytest.mark.slow
def test_compare_ranks_the_four_by_validation_epe(slurm_sweep):
    cwd = slurm_sweep["cwd"]
    done = make(cwd, "compare", "SWEEP=configs/sweeps/tiny.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    out = cwd / "runs/sweeps/tiny/compare"
    ranking = [line.split("|")[1:-1] for line in (out / "compare.md").read_text().split("\n## ")[0].splitlines()
               if re.match(r"\| \d \|", line)]
    best = {t: min(r["val/epe/pooled"] for r in metrics(slurm_sweep["second"][t]["run_dir"])
                   if "val/epe/pooled" in r and r["step"] > 0) for t in TRIALS}
    assert [row[1].strip() for row in ranking] == sorted(TRIALS, key=best.get)
    assert [float(row[4]) for row in ranking] == pytest.approx(sorted(best.values()), abs=1e-3)
    from PIL import Image

    for name in ("sweep.png", "val.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.width > 500 and image.height > 250


# --- the docs' walk-through --------------------------------------------------------------------------------------


def docs_commands() -> list[list[str]]:
    """The three commands of docs/sweeps.md's learning-rate walk-through, as written there."""
    text = (REPO / "docs" / "sweeps.md").read_text()
    section = text.split("## A learning-rate sweep for `finetune_custom` in three commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def custom_project(tmp_path_factory) -> Path:
    """finetune_custom's files where the recipe expects them: tiny shards in shards/custom{,_val}, a tiny
    released-format checkpoint as pretrained/foundationstereo_vitl/model_best_bp2.pth (tests/test_finetune.py)."""
    from stereo.model.io import export_released
    from test_finetune import perturbed_tiny, write_pairs

    root = tmp_path_factory.mktemp("custom")
    cwd = project(root / "project")
    for split, count, seed, out in (("train", 4, 0, "custom"), ("val", 1, 1, "custom_val")):
        listing = write_pairs(root / "raw", split, count, seed)
        done = subprocess.run([sys.executable, "-m", "stereo", "shards", "--dataset", "generic", "--src",
                               str(listing), "--out", str(cwd / "shards" / out), "--workers", "1"],
                              cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-3000:]
    (cwd / "pretrained" / "foundationstereo_vitl").mkdir(parents=True)
    export_released(perturbed_tiny(7, 0.01), cwd / "pretrained/foundationstereo_vitl/model_best_bp2.pth",
                    global_step=1, epoch=1)
    return cwd


# finetune_custom made tiny (its data and starting file are where the recipe looks); wandb offline to check it
TINY_FINETUNE = ["model.size=tiny", "model.hidden_dims=[32,32,32]", "model.max_disp=64", "model.train_iters=2",
                 "model.valid_iters=2", "augment.crop=[64,128]", "data.batch_size=1", "data.num_workers=0",
                 "data.val_samples=null", "train.precision=fp32", "train.steps=2", "train.val_every=2",
                 "checkpoint.every=2", "schedule.warmup_steps=1", "logging.every=1", "logging.image_every=0",
                 "logging.wandb=offline", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.mem_gb=2"]


def wandb_run(run_dir: Path):
    """The run record of a trial's offline wandb run (wandb's .wandb file: leveldb-log blocks of protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunks = path.read_bytes(), 7, []  # after the ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"{path}: no run record")


@pytest.mark.slurm
@pytest.mark.slow
def test_docs_learning_rate_walkthrough(cluster, custom_project):  # noqa: F811 - the imported fixture
    commands = docs_commands()
    assert [c[:2] for c in commands] == [["make", "sweep"], ["make", "sweep-status"], ["make", "compare"]]
    assert all(c[2] == "SWEEP=configs/sweeps/finetune_lr.yaml" for c in commands)
    cwd = custom_project
    done = make(cwd, *commands[0][1:], *TINY_FINETUNE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "submitted job array" in done.stdout
    trials = records(cwd, "finetune_lr")
    assert [t["overrides"] for t in trials.values()] == [[f"optim.lr={lr}"] for lr in
                                                        ("5.0e-06", "1.0e-05", "2.0e-05", "4.0e-05")]
    wait_for(lambda: all(task_state(t["job_id"]) in FINAL_STATES for t in trials.values()), 900,
             "the four trials to end")
    status = make(cwd, *commands[1][1:])
    assert status.returncode == 0 and status.stdout.count("| completed | 2/2 |") == 4, status.stdout + status.stderr
    compared = make(cwd, *commands[2][1:])
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert (cwd / "runs/sweeps/finetune_lr/compare/sweep.png").is_file()
    assert "| 1 | t0" in (cwd / "runs/sweeps/finetune_lr/compare/compare.md").read_text()
    for trial in trials.values():
        run = wandb_run(Path(trial["run_dir"]))
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        lr = trial["overrides"][0].split("=")[1]
        assert run.run_group == "finetune_lr" and "sweep:finetune_lr" in run.tags
        assert run.display_name == f"finetune_custom optim.lr={lr}" and config["optim"]["lr"] == float(lr)
