"""Fine-tuning starting points end to end: `finetune_custom` on a generic-list fixture, from a released-format tiny
checkpoint, through the real `shards`, torchrun/DeepSpeed `train`, `export` and `eval` commands (CPU).

One run directory carries the chain (module-scoped, ~1 min on 2 cores):
  1. start from `init.pth` with a learning rate of exactly 0 (step schedule decayed at 0 by a factor 0) for one
     step: the checkpoint holds the starting parameters bit for bit, and the step-0 validation scores the same as
     `eval` of the file itself;
  2. restart the same directory with a real learning rate and `model.init_from` pointing at another file: it
     resumes from its own step-1 checkpoint and trains to step 4;
  3. export and evaluate the result.
Also: the random-frozen-ViT refusal through the real command, the release-size Depth Anything V2 / EdgeNeXt layouts
from the released model's manifest, and the loss options that tests/test_loss.py leaves out.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port
from stereo.config import load_config
from stereo.config.errors import ConfigError
from stereo.config.schema import LossConfig, ModelConfig
from stereo.data.codecs import encode_kitti_png, encode_png, write_pfm
from stereo.model import build_model
from stereo.model.backbone import Feature, backbone_dims
from stereo.model.io import export_released, load_released
from stereo.model.pretrained import EDGENEXT_CLASSIFIER_KEYS, load_depth_anything, load_edgenext
from stereo.train.checkpoint import find_checkpoint
from stereo.train.loss import stereo_loss

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
MANIFESTS = REPO / "stereo" / "model" / "manifests"
H, W = 96, 160  # large enough for a 64x128 crop after the recipe's zoom-out (2^-0.2)
DA_PREFIX = "feature.dino.depth_anything."


def tiny_model_config() -> ModelConfig:
    return ModelConfig(size="tiny", max_disp=64, hidden_dims=[32, 32, 32])


# --- the fixture data: a generic list with PNG images and PFM / 16-bit PNG disparities ---------------------------


def write_pairs(root: Path, name: str, count: int, seed: int) -> Path:
    """`count` pairs of a textured scene shifted by a constant disparity; alternately PFM and KITTI-style PNG."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "disp").mkdir(exist_ok=True)
    lines = ["# left right disparity"]
    for index in range(count):
        d = 4 + 2 * index
        texture = rng.integers(0, 256, (H, W + d, 3), dtype=np.uint8)
        left, right = texture[:, :W], texture[:, d:]  # left(x) = right(x - d)
        stem = f"{name}{index}"
        (root / "images" / f"{stem}_L.png").write_bytes(encode_png(np.ascontiguousarray(left)))
        (root / "images" / f"{stem}_R.png").write_bytes(encode_png(np.ascontiguousarray(right)))
        disp = np.full((H, W), float(d), np.float32)
        if index % 2:
            (root / "disp" / f"{stem}.png").write_bytes(encode_kitti_png(disp))
            disp_name = f"disp/{stem}.png"
        else:
            write_pfm(root / "disp" / f"{stem}.pfm", disp)
            disp_name = f"disp/{stem}.pfm"
        lines.append(f"images/{stem}_L.png images/{stem}_R.png {disp_name}")
    listing = root / f"{name}.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def stereo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stereo", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MASTER_PORT": str(free_port())})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("custom")
    out = {}
    for split, count, seed in (("train", 4, 0), ("val", 2, 1)):
        listing = write_pairs(root / "raw", split, count, seed)
        shards = root / "shards" / split
        result = stereo("shards", "--dataset", "generic", "--src", str(listing), "--out", str(shards),
                        "--workers", "1")
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((shards / "manifest.json").read_text())
        assert manifest["num_samples"] == count and not manifest["bad_samples"]
        out[split] = shards
    return out


def perturbed_tiny(seed: int, scale: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_model_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)  # no weight stays exactly 0 (biases start at 0)
    return model


@pytest.fixture(scope="module")
def starts(tmp_path_factory) -> dict[str, Path]:
    """`init.pth` and `other.pth`: released-format tiny checkpoints {"model", "global_step", "epoch"}."""
    root = tmp_path_factory.mktemp("pretrained")
    files = {}
    for name, seed, scale in (("init", 7, 0.01), ("other", 8, 0.5)):
        path = root / f"{name}.pth"
        export_released(perturbed_tiny(seed, scale), path, global_step=123_456, epoch=9)
        payload = torch.load(path, weights_only=True)
        assert set(payload) == {"model", "global_step", "epoch"}  # exactly the released layout, no config
        files[name] = path
    return files


def tiny_overrides(data: dict[str, Path], run_dir: Path) -> list[str]:
    """finetune_custom made tiny: the recipe's schedule, EMA, optimizer and validation stay as they are."""
    return ["model.size=tiny", "model.hidden_dims=[32,32,32]", "model.max_disp=64", "model.train_iters=2",
            "model.valid_iters=2", "augment.crop=[64,128]", "data.batch_size=1", "data.num_workers=1",
            f"data.train=[{{name: custom, shards: {data['train']}}}]",
            f"data.val=[{{name: custom_val, shards: {data['val']}}}]", "data.val_samples=null",
            "train.precision=fp32", "logging.wandb=disabled", "logging.every=1", "logging.image_every=0",
            "checkpoint.keep_last=2", f"train.run_dir={run_dir}"]


def torchrun_train(overrides: list[str], log: Path) -> tuple[int, str]:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "1", "-m", "stereo", "train", "finetune_custom", *overrides]
    with open(log, "a") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    return code, log.read_text()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def module_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_dir / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def parameter_names(cfg: ModelConfig) -> set[str]:
    with torch.device("meta"):
        return {name for name, _ in build_model(cfg).named_parameters()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data, starts) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    run_dir = root / "run"
    base = tiny_overrides(data, run_dir)
    lr_zero = ["schedule.kind=step", "schedule.warmup_steps=0", "schedule.decay_at=0.0", "schedule.decay_factor=0.0",
               "train.steps=1", "checkpoint.every=1", f"model.init_from={starts['init']}"]
    code, first_log = torchrun_train(base + lr_zero, root / "first.log")
    assert code == 0, first_log[-4000:]
    first = {"step_dir": find_checkpoint(run_dir), "metrics": metrics(run_dir)}
    first["weights"] = module_weights(first["step_dir"])
    first["ema"] = torch.load(first["step_dir"] / "trainer_state_rank0.pt", weights_only=False)["ema"]["shadow"]
    # the restart: a real learning rate, and an init file that must lose against the run's own checkpoint
    # (a new learning rate and schedule on resume must be allowed explicitly)
    resume = ["optim.lr=1.0e-3", "schedule.warmup_steps=1", "train.steps=4", "checkpoint.every=2",
              f"model.init_from={starts['other']}", "train.allow_config_change=true"]
    code, second_log = torchrun_train(base + resume, root / "second.log")
    assert code == 0, second_log[-4000:]
    return {"run_dir": run_dir, "root": root, "first": first, "second_log": second_log,
            "final": module_weights(find_checkpoint(run_dir))}


def test_released_format_start_has_identical_weights_at_step_zero(finetuned, starts):
    first = finetuned["first"]
    step1 = [r for r in first["metrics"] if "loss" in r]
    assert [r["step"] for r in step1] == [1] and step1[0]["lr"] == 0.0 and math.isfinite(step1[0]["loss"])
    start = torch.load(starts["init"], weights_only=True)["model"]
    held = first["weights"]
    assert held.keys() == start.keys()
    params = parameter_names(tiny_model_config())
    frozen_vit = [k for k in params if k.startswith(DA_PREFIX)]
    assert frozen_vit and len(params) > len(frozen_vit)  # both the frozen ViT and the trained parts are compared
    for key in params:  # an update at lr 0 is exact: the step-1 checkpoint holds the step-0 parameters
        assert torch.equal(held[key], start[key]), key
    for key, value in first["ema"].items():
        assert torch.equal(value, start[key]), key
    # BatchNorm running statistics move in any train-mode forward (before the update); all other buffers are kept
    for key in held.keys() - params:
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(held[key], start[key]), key


def test_step_zero_validation_scores_the_starting_file(finetuned, starts, data):
    """The recipe validates at step 0 (before any forward in train mode): the same numbers as `eval` of init.pth,
    so the whole starting state (buffers included) is what the trainer held."""
    before = next(r for r in finetuned["first"]["metrics"] if r["step"] == 0 and "val/epe/pooled" in r)
    out = finetuned["root"] / "eval_init"
    result = stereo("eval", "--ckpt", str(starts["init"]), "--config", str(finetuned["run_dir"] / "config.yaml"),
                    "--bench", "kitti15", "--data", str(data["val"]), "--iters", "2", "--max-disp", "64",
                    "--device", "cpu", "--no-images", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    scores = results.get("summary", results)
    assert scores["epe/pooled"] == pytest.approx(before["val/epe/pooled"], rel=1e-5, abs=1e-6)


def test_resume_wins_over_init_from(finetuned, starts):
    log = finetuned["second_log"]
    assert "resumed at step 1 from" in log and "step_00000001" in log
    steps = [r["step"] for r in metrics(finetuned["run_dir"]) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # continued, not restarted at 1
    assert [r["step"] for r in metrics(finetuned["run_dir"]) if "val/epe/pooled" in r] == [0, 1, 4]  # no new step 0
    start = torch.load(starts["init"], weights_only=True)["model"]
    other = torch.load(starts["other"], weights_only=True)["model"]
    final, step1 = finetuned["final"], finetuned["first"]["weights"]
    params = parameter_names(tiny_model_config())
    vit = [k for k in params if k.startswith(DA_PREFIX)]
    trained = [k for k in params if not k.startswith(DA_PREFIX)]
    assert all(torch.equal(final[k], start[k]) for k in vit)  # frozen: still the run's own start, not other.pth
    assert not any(torch.equal(final[k], other[k]) for k in vit)
    moved = max((final[k] - step1[k]).abs().max().item() for k in trained)
    assert 0 < moved < 3 * 1.0e-3 * 1.5  # three AdamW steps at lr <= 1e-3 from the step-1 weights
    assert max((final[k] - other[k]).abs().max().item() for k in trained) > 0.5


def test_finetuned_run_exports_and_evaluates(finetuned, data):
    run_dir, root = finetuned["run_dir"], finetuned["root"]
    exported = root / "finetuned.pth"
    result = stereo("export", str(run_dir), "--out", str(exported), "--ema")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = torch.load(exported, weights_only=False)
    assert payload["global_step"] == 4
    model = build_model(load_config(run_dir / "config.yaml").model)
    load_released(model, exported)  # strict: the fine-tuned file is itself a valid starting point
    for ckpt in (run_dir, exported):  # `make eval CKPT=<run dir or export>`
        out = root / f"eval_{Path(ckpt).name}"
        result = stereo("eval", "--ckpt", str(ckpt), "--bench", "kitti15", "--data", str(data["val"]),
                        "--device", "cpu", "--no-images", "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        scores = results.get("summary", results)
        assert math.isfinite(scores["epe/pooled"]) and "epe/pooled" in result.stdout


def test_random_frozen_vit_is_refused_by_the_train_command(tmp_path, data):
    run_dir = tmp_path / "refused"
    result = stereo("train", "finetune_custom", *tiny_overrides(data, run_dir), "model.init_from=null")
    assert result.returncode == ConfigError.exit_code, result.stderr[-3000:]
    assert "config error" in result.stderr and "model.pretrained.depth_anything" in result.stderr
    assert "allow_random_vit" in result.stderr and "frozen ViT is still random" in result.stderr
    assert not (run_dir / "checkpoints").exists()


# --- release-size starting files: the layouts of the real files, from the released model's manifest ---------------


def manifest(size: str) -> dict[str, tuple[int, ...]]:
    rows = (MANIFESTS / f"foundationstereo_{size}_state_dict.tsv").read_text().splitlines()[1:]
    out = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        out[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out


def release_files(size: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(depth_anything_v2_<size>.pth layout, timm edgenext_small layout) as the released FoundationStereo embeds
    them: its `feature.dino.depth_anything.*` keys are the Depth Anything V2 file's, its `feature.stem/stages.*` are
    timm's (which adds the classifier)."""
    rows = manifest(size)
    da = {k[len(DA_PREFIX):]: s for k, s in rows.items() if k.startswith(DA_PREFIX)}
    edgenext = {k[len("feature."):]: s for k, s in rows.items() if k.startswith(("feature.stem.", "feature.stages."))}
    width = edgenext["stages.3.blocks.0.gamma"][0]
    edgenext |= {"head.norm.weight": (width,), "head.norm.bias": (width,), "head.fc.weight": (1000, width),
                 "head.fc.bias": (1000,)}
    return da, edgenext


def test_release_size_depth_anything_and_edgenext_files_load_completely(tmp_path):
    """ViT-S size: real files with every key of the release layouts load with nothing missing or left over."""
    da_layout, edgenext_layout = release_files("vits")
    torch.manual_seed(0)
    files = {}
    for name, layout in (("depth_anything_v2_vits.pth", da_layout), ("edgenext_small.pth", edgenext_layout)):
        tensors = {k: torch.randn(s) if s else torch.tensor(0) for k, s in layout.items()}
        torch.save(tensors, tmp_path / name)
        files[name] = tensors
    feature = Feature(backbone_dims("vits"))
    da = load_depth_anything(feature, tmp_path / "depth_anything_v2_vits.pth")
    assert da.loaded == len(da_layout) == len(feature.dino.depth_anything.state_dict())
    en = load_edgenext(feature, tmp_path / "edgenext_small.pth")
    assert en.loaded == len(edgenext_layout) - 4 and sorted(en.ignored) == sorted(
        k for k in EDGENEXT_CLASSIFIER_KEYS if k.startswith("head."))
    ours = feature.state_dict()
    for key in ("pretrained.blocks.11.mlp.fc2.weight", "depth_head.scratch.refinenet4.out_conv.weight"):
        assert torch.equal(ours[f"dino.depth_anything.{key}"], files["depth_anything_v2_vits.pth"][key])
    assert torch.equal(ours["stages.3.blocks.0.gamma"], files["edgenext_small.pth"]["stages.3.blocks.0.gamma"])
    assert feature.vit_initialised_from == str(tmp_path / "depth_anything_v2_vits.pth")


@pytest.mark.parametrize("size", ["vitb", "vitl"])
def test_release_layouts_match_our_modules_at_every_size(size):
    """ViT-B/L (too large to write in a test): the same key and shape sets, checked on the meta device."""
    da_layout, edgenext_layout = release_files(size)
    with torch.device("meta"):
        feature = Feature(backbone_dims(size))
    da_ours = {k: tuple(v.shape) for k, v in feature.dino.depth_anything.state_dict().items()}
    assert da_ours == da_layout
    en_ours = {k: tuple(v.shape) for k, v in feature.state_dict().items() if k.startswith(("stem.", "stages."))}
    assert en_ours == {k: s for k, s in edgenext_layout.items() if not k.startswith("head.")}


# --- loss options not covered by tests/test_loss.py -------------------------------------------------------------


def constant_case() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gt = torch.full((1, 1, 4, 4), 10.0)
    init = torch.full((1, 1, 1, 1), 2.0)  # x4 -> 8.0: error 2 everywhere (smooth-L1: 1.5)
    preds = [torch.full_like(gt, 13.0), torch.full_like(gt, 10.5), torch.full_like(gt, 9.75)]  # errors 3, .5, .25
    return init, preds, gt, torch.ones_like(gt, dtype=torch.bool)


@pytest.mark.parametrize("init_kind, init_term", [("l1", 2.0), ("epe", 2.0), ("smooth_l1", 1.5)])
@pytest.mark.parametrize("seq_kind, errors", [("l1", (3.0, 0.5, 0.25)), ("epe", (3.0, 0.5, 0.25)),
                                              ("smooth_l1", (2.5, 0.125, 0.03125))])
def test_every_kind_on_each_term(init_kind, init_term, seq_kind, errors):
    init, preds, gt, valid = constant_case()
    cfg = LossConfig(init_kind=init_kind, seq_kind=seq_kind, init_weight=1.0, gamma=0.5)
    terms = stereo_loss(init, preds, gt, valid, max_disp=64, cfg=cfg)
    assert terms["init"].item() == pytest.approx(init_term)
    assert terms["seq"].item() == pytest.approx(0.25 * errors[0] + 0.5 * errors[1] + errors[2])
    assert terms["epe"].item() == pytest.approx(0.25)  # always the plain EPE of the last prediction


@pytest.mark.parametrize("rescale", [False, True])
def test_gamma_with_and_without_raft_stereo_rescaling_in_the_loss(rescale):
    init, preds, gt, valid = constant_case()
    terms = stereo_loss(init, preds, gt, valid, 64, LossConfig(seq_kind="l1", gamma=0.9, rescale_gamma=rescale))
    gamma = 0.9 ** (15 / 2) if rescale else 0.9  # N = 3
    assert terms["seq"].item() == pytest.approx(gamma**2 * 3.0 + gamma * 0.5 + 0.25)


def test_single_prediction_with_rescaling_and_init_weight_zero():
    init, preds, gt, valid = constant_case()
    terms = stereo_loss(init, preds[-1:], gt, valid, 64, LossConfig(seq_kind="l1", rescale_gamma=True, init_weight=0))
    assert terms["seq"].item() == pytest.approx(0.25)  # N = 1: weight 1, no division by N - 1
    assert terms["init"].item() == pytest.approx(1.5)  # still reported for logging
    assert terms["total"].item() == pytest.approx(0.25)  # but weighted out of the total
    weighted = stereo_loss(init, preds, gt, valid, 64, LossConfig(init_weight=2.5, gamma=1.0))
    assert weighted["total"].item() == pytest.approx(2.5 * 1.5 + 3.0 + 0.5 + 0.25)
