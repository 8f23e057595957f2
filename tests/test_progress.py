"""Progress reporting: a bar on a terminal, plain lines in a log file, samples/s shown, the validation total known,
and the end of a run naming the checkpoint and the commands to run next."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from stereo.config import load_config
from stereo.data.loader import count_val_samples
from stereo.progress import TrainProgress, next_steps, track

REPO = Path(__file__).resolve().parents[1]
SCALARS = {"loss": 1.5, "lr": 1e-3, "samples_per_s": 3.25}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(stream, steps: int = 6, interval_s: float = 3600.0) -> str:
    progress = TrainProgress(steps, 0, stream=stream, interval_s=interval_s)
    for _ in range(steps):
        progress.update()
        progress.log(SCALARS)
    progress.close()
    return stream.getvalue()


def test_log_file_gets_whole_lines_not_a_bar():
    text = run_steps(io.StringIO())
    assert "\r" not in text
    # the first logged numbers at once, then at most one line per interval, and the last step
    assert text.splitlines()[0].startswith("train step 1/6 (16%)  loss 1.500  lr 1.00e-03  samples/s 3.25  [")
    assert len(text.splitlines()) == 2 and text.splitlines()[1].startswith("train step 6/6 (100%)")
    assert len(run_steps(io.StringIO(), interval_s=0.0).splitlines()) == 6  # the interval is what limits them


def test_terminal_gets_a_bar_with_samples_per_second():
    text = run_steps(Terminal())
    assert "\r" in text and "samples/s=3.25" in text and "6/6" in text


def test_disabled_progress_is_silent():
    stream = io.StringIO()
    progress = TrainProgress(4, 0, enabled=False, stream=stream, interval_s=0.0)
    progress.update()
    progress.log(SCALARS)
    progress.close()
    assert stream.getvalue() == ""


def test_track_plain_lines_carry_the_total():
    stream = io.StringIO()
    assert list(track(range(3), 3, "validation 0", "img", stream=stream, interval_s=0.0)) == [0, 1, 2]
    assert stream.getvalue().splitlines() == [
        "validation 0: 1/3 img [0 s]", "validation 0: 2/3 img [0 s]", "validation 0: 3/3 img [0 s]",
        "validation 0: 3/3 img done [0 s]"]
    quiet = io.StringIO()
    assert list(track(range(3), 3, "eval", "img", stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""


def test_validation_total_comes_from_the_manifests():
    if not (REPO / "shards/demo/val/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stereo", "demo-data", "--out", "shards/demo"], cwd=REPO, check=True)
    data = load_config(REPO / "configs/tiny.yaml", [f"data.val=[{{name: v, shards: {REPO}/shards/demo/val}}]"]).data
    assert count_val_samples(data) == 9  # 8 scenes and the motorcycle
    data.val_samples = 4
    assert count_val_samples(data) == 4
    data.val[0].shards = str(REPO / "shards/demo/val/000000.tar")  # a tar alone: no manifest, no total
    assert count_val_samples(data) is None


@pytest.mark.parametrize("config, bench", [("tiny", "BENCH=demo"), ("stereo_v1", "BENCH=<kitti15|middeval3|eth3d|...> DATA=<its directory>")])
def test_end_of_run_names_the_checkpoint_and_what_to_run_next(config, bench):
    text = next_steps(Path("runs/x"), Path("runs/x/checkpoints/step_00000300"), load_config(config), 161.0)
    assert text.splitlines()[0] == "done in 2 min 41 s: checkpoint runs/x/checkpoints/step_00000300"
    assert f"make eval CKPT=runs/x {bench}" in text
    assert "make demo-pair && make infer CKPT=runs/x LEFT=shards/demo/motorcycle/left.png" in text
    assert "make export RUN=runs/x OUT=runs/x/model.pth" in text and "make compare 'RUNS=runs/x " in text


def test_printed_commands_keep_a_run_directory_with_spaces_and_quotes_whole(tmp_path):
    """`make export RUN=runs/my run` was `make: *** No rule to make target 'run'` (issue 22)."""
    run = tmp_path / "my run's dir"
    run.mkdir()
    text = next_steps(run, None, load_config("tiny"), 1.0)
    export = next(line for line in text.splitlines() if "make export" in line).split("   #")[0].strip()
    done = subprocess.run(["bash", "-c", export.replace("make ", "make --no-print-directory ", 1)], cwd=REPO,
                          capture_output=True, text=True)
    assert "No rule to make target" not in done.stderr and done.returncode != 0
    assert str(run) in done.stderr, done.stderr


def test_a_stop_between_logged_steps_says_whose_loss_the_last_line_shows():
    stream = io.StringIO()
    progress = TrainProgress(100, 0, stream=stream, interval_s=3600.0)
    for step in range(1, 8):  # logged every 5 steps, stopped at step 7
        if step % 5 == 0:
            progress.log(SCALARS, step)
        progress.update()
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith(
        "train step 7/100 (7%)  loss 1.500  lr 1.00e-03  samples/s 3.25 (logged at step 5)  [")


def test_resume_command_names_the_run_directory():
    from stereo.progress import resume_command

    assert resume_command(Path("runs/tiny-20261207-040000")) == "make resume RUN=runs/tiny-20261207-040000"
    assert resume_command(Path("runs/my run")) == "make resume 'RUN=runs/my run'"


def test_a_sweep_trial_ends_with_its_checkpoint_only():
    """The sweep prints what next once, for all its trials (make compare SWEEP=...)."""
    text = next_steps(Path("runs/sweeps/tiny/t00"), Path("runs/sweeps/tiny/t00/checkpoints/step_00000100"),
                      load_config("tiny", ["logging.tags=[sweep:tiny]"]), 61.0)
    assert text == "done in 1 min 01 s: checkpoint runs/sweeps/tiny/t00/checkpoints/step_00000100"


def test_numbers_of_the_step_being_finished_carry_no_label():
    """The loop logs a step's numbers before its update(): the first line shows them as they are."""
    stream = io.StringIO()
    progress = TrainProgress(8, 3, stream=stream, interval_s=3600.0)
    progress.log(SCALARS, 4)
    assert "logged at" not in stream.getvalue() and "loss 1.500" in stream.getvalue()
