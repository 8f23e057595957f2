"""Export a trained run in the released format and load it strictly into a fresh model; a run started from that
file (`model.init_from`, fine-tuning) begins at exactly its weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stereo.config import load_config
from stereo.model import build_model
from stereo.model.io import load_released
from stereo.train.checkpoint import find_checkpoint
from stereo.train.export import load_checkpoint_weights, read_trainer_state
from tests.test_train import REPO, run

pytestmark = pytest.mark.usefixtures("demo_shards")

TWO_STEPS = ("train.steps=2", "checkpoint.every=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    code, log = run(run_dir, 1, TWO_STEPS)
    assert code == 0, log[-3000:]
    return run_dir


def export(run_dir: Path, out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "stereo", "export", str(run_dir), "--out", str(out), *extra], cwd=REPO,
                   check=True)


def fresh_model(run_dir: Path):
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(123)  # other random weights than the run's
    return build_model(cfg.model)


@pytest.mark.parametrize("use_ema", [False, True], ids=["live", "ema"])
def test_export_round_trip_through_the_strict_loader(trained, tmp_path, use_ema):
    out = tmp_path / "model.pth"
    export(trained, out, *(["--ema"] if use_ema else []))
    payload = torch.load(out, map_location="cpu", weights_only=False)
    assert payload["global_step"] == 2 and "epoch" in payload
    assert out.with_suffix(".safetensors").is_file()
    model = fresh_model(trained)
    load_released(model, out)  # strict: every key, every shape
    reference = fresh_model(trained)
    load_checkpoint_weights(reference, find_checkpoint(trained), use_ema)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    shadow = read_trainer_state(find_checkpoint(trained))["ema"]["shadow"]
    live = torch.load(find_checkpoint(trained) / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    params = dict(model.named_parameters())
    for name, value in shadow.items():
        assert torch.equal(params[name], value if use_ema else live[name]), name
    assert any(not torch.equal(shadow[n], live[n]) for n in shadow)  # EMA and live weights differ after two steps


def test_init_from_starts_at_the_files_weights(trained, tmp_path):
    exported = tmp_path / "start.pth"
    export(trained, exported, "--ema")
    run_dir = tmp_path / "finetune"
    # a learning rate of 1e-30 makes the one step a no-op in fp32: the checkpoint shows the starting weights
    code, log = run(run_dir, 1, ("train.steps=1", "checkpoint.every=1", f"model.init_from={exported}",
                                 "optim.lr=1e-30", "model.pretrained.allow_random_vit=false"))
    assert code == 0, log[-3000:]
    start = torch.load(exported, weights_only=False)["model"]
    module = torch.load(find_checkpoint(run_dir) / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module.keys() == start.keys()
    # the parameters (BatchNorm running statistics move in any training forward)
    for key, _ in fresh_model(trained).named_parameters():
        assert torch.allclose(module[key], start[key], rtol=0, atol=1e-20), key
