"""README's "After `make train`" walk-through, run as written on the demo data.

The commands come from the README's code block itself; only the `make train` lines get overrides that make the
runs short (4 steps, small crops, 2 GRU iterations, no wandb). They run in a scratch directory holding a copy of the Makefile,
the venv and the demo shards, so that the repository's runs/ stays untouched.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.steps=4", "checkpoint.every=4", "logging.every=1", "logging.image_every=2", "augment.crop=[64,128]",
         "data.batch_size=1", "model.train_iters=2", "model.valid_iters=2", "schedule.warmup_steps=1",
         "logging.wandb=disabled"]
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def walkthrough() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## After `make train`", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    if not (REPO / "shards/demo/val/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "stereo", "demo-data", "--out", "shards/demo"], cwd=REPO, check=True)
    root = tmp_path_factory.mktemp("walkthrough")
    (root / "Makefile").write_text((REPO / "Makefile").read_text())
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    (root / "configs").symlink_to(REPO / "configs")
    for split in ("train", "val"):
        (root / "shards/demo").mkdir(parents=True, exist_ok=True)
        (root / "shards/demo" / split).symlink_to(REPO / "shards/demo" / split)
    return root


def test_readme_walkthrough_runs_as_written(scratch):
    commands = walkthrough()
    assert [c.split()[1] for c in commands] == ["train", "eval", "demo-pair", "infer", "export", "train", "compare"]
    env = {**MAKE_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    outputs = {}
    for command in commands:
        argv = shlex.split(command) + (SHORT if command.startswith("make train") else [])
        proc = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.setdefault(argv[1], []).append(proc)
    run = scratch / "runs/demo"

    # the end of the first run says where its checkpoint is and prints the eval line of the walk-through
    first = outputs["train"][0].stdout
    assert "checkpoint runs/demo/checkpoints/step_00000004" in first
    assert "make eval CKPT=runs/demo BENCH=demo OUT=runs/demo/eval" in first
    # eval on the demo benchmark reproduces the EPE the training's validation printed, with no paper number
    after = float(re.search(r"before training [\d.]+ -> after ([\d.]+)", first).group(1))
    evaluated = float(re.search(r"epe/pooled: ([\d.]+)", outputs["eval"][0].stdout).group(1))
    assert abs(evaluated - after) < 1e-3 and "paper" not in outputs["eval"][0].stdout
    # the real pair's EPE on its own line (the pooled number mixes it with the synthetic scenes)
    assert re.search(r"\n  motorcycle \(the real Middlebury pair\): [\d.]+ -> [\d.]+ px\n", first), first[-2000:]
    assert (run / "eval/results.md").is_file() and (run / "eval/summary.png").is_file()
    # infer prints the disparity range; the colour picture carries its colour bar below the image
    assert re.search(r"disparity -?[\d.]+ \.\. [\d.]+ px", outputs["infer"][0].stdout)
    with Image.open(run / "motorcycle/disp_color.png") as color:
        assert color.width == 741 and color.height > 500
    assert (run / "model.pth").is_file()
    assert (scratch / "runs/compare/compare.md").is_file() and "optim.lr" in outputs["compare"][0].stdout
    # validation panels go through the run logger (saved with the run, and to wandb when it is on) before and after
    assert sorted(p.name for p in (run / "images").glob("val_*")) == [
        "val_disparity_0_00000000.png", "val_disparity_0_00000004.png",
        "val_disparity_1_00000000.png", "val_disparity_1_00000004.png"]
