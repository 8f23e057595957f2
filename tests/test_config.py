"""Config loading: every shipped config, `base:` inheritance, typed overrides, errors that name file and key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stereo.config import ConfigError, dump_yaml, from_dict, load_config
from stereo.config.load import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
# `make test` runs this suite under make: a nested make would print "Entering directory" lines
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_paper_recipe_values():
    cfg = load_config("stereo_v1")
    assert (cfg.model.size, cfg.model.max_disp, cfg.model.train_iters, cfg.model.valid_iters) == ("vitl", 416, 22, 32)
    assert (cfg.optim.lr, cfg.schedule.kind, cfg.schedule.decay_at, cfg.schedule.decay_factor) == (1e-4, "step", 0.8, 0.1)
    assert cfg.train.steps == 200_000 and cfg.augment.crop == [320, 736] and cfg.loss.gamma == 0.9
    assert cfg.data.batch_size * cfg.slurm.nodes * cfg.slurm.gpus_per_node == 128
    names = {d.name for d in cfg.data.train}
    assert names == {"fsd", "sceneflow", "sintel", "crestereo", "fallingthings", "instereo2k", "vkitti2"}


def test_base_inheritance_merges_sections(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: stereo_v1\noptim:\n  lr: 5.0e-5\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 5e-5
    assert cfg.optim.grad_clip == 1.0  # from the base, untouched
    assert cfg.model.size == "vitl"
    assert cfg.name == "child"


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="cycles"):
        load_config(tmp_path / "a.yaml")


def test_overrides_are_typed():
    cfg = load_config("tiny", ["optim.lr=3e-4", "train.steps=7", "model.hidden_dims=[16,16,16]",
                               "model.init_from=/x/model.pth", "logging.tags=[a,b]"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.hidden_dims == [16, 16, 16]
    assert cfg.model.init_from == "/x/model.pth"
    assert cfg.logging.tags == ["a", "b"]


@pytest.mark.parametrize("override, key, expected", [
    ("train.steps=many", "train.steps", "an integer"),
    ("train.steps=1.5", "train.steps", "an integer"),
    ("model.freeze_vit=3", "model.freeze_vit", "true or false"),
    ("model.size=vitx", "model.size", "one of"),
    ("augment.crop=[100,200]", "augment.crop", "multiple of 32"),
    ("checkpoint.keep_last=1", "checkpoint.keep_last", ">= 2"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "0, 1, 2 or 3"),
    ("deepspeed.offload_optimizer=true", "deepspeed.offload_optimizer", "zero_stage 1, 2 or 3"),
    ("optim=3", "optim", "a mapping"),
    # values that pass the type check but used to break the run
    ("checkpoint.every=0", "checkpoint.every", ">= 1"),
    ("checkpoint.every=-5", "checkpoint.every", ">= 1"),
    ("logging.every=0", "logging.every", ">= 1"),
    ("train.val_every=0", "train.val_every", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.max_bad_steps=0", "train.max_bad_steps", ">= 1"),
    ("data.max_bad_sample_rate=-1", "data.max_bad_sample_rate", "in [0, 1]"),
    ("data.max_bad_sample_rate=1.5", "data.max_bad_sample_rate", "in [0, 1]"),
    ("optim.grad_clip=-1", "optim.grad_clip", ">= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas", "in [0, 1)"),
    ("augment.crop=[1,2", "augment.crop", "a YAML value"),
    # accepted before issue 22: a negative warmup (the cosine started at 0.8x the peak), zero nodes (sbatch refused)
    ("schedule.warmup_steps=-5", "schedule.warmup_steps", ">= 0"),
    ("slurm.nodes=0", "slurm.nodes", ">= 1"),
    ("schedule.kind=onecycle", None, None),
    ("schedule.pct_start=1", "schedule.pct_start", "in (0, 1)"),
    ("schedule.min_ratio=-0.1", "schedule.min_ratio", "in [0, 1]"),
    ("schedule.decay_at=2", "schedule.decay_at", "in [0, 1]"),
    ("schedule.decay_factor=-1", "schedule.decay_factor", ">= 0"),
    ("loss.gamma=0", "loss.gamma", "in (0, 1]"),
    ("loss.init_weight=-1", "loss.init_weight", ">= 0"),
    ("slurm.gpus_per_node=-1", "slurm.gpus_per_node", ">= 0"),
    ("slurm.cpus_per_task=0", "slurm.cpus_per_task", ">= 1"),
    ("slurm.time_min=0", "slurm.time_min", ">= 1"),
    ("slurm.max_requeues=-1", "slurm.max_requeues", ">= 0"),
    ("slurm.mem_gb=0", "slurm.mem_gb", ">= 1 or null"),
    ("slurm.signal_delay_s=7200", "slurm.signal_delay_s", "less than slurm.time_min"),
    ("deepspeed.fp16_loss_scale_window=0", "deepspeed.fp16_loss_scale_window", ">= 1"),
    ("augment.yjitter=-1", "augment.yjitter", ">= 0"),
    ("augment.hue=0.9", "augment.hue", "in [0, 0.5]"),
    ("augment.scale=[0.4,-0.2]", "augment.scale", "low <= high"),
    ("eval.iters=0", "eval.iters", ">= 1 or null"),
])
def test_bad_values_name_the_key(override, key, expected):
    if key is None:  # a valid value next to the refused ones
        load_config("tiny", [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert info.value.key == key
    assert expected in str(info.value)
    assert ("tiny.yaml" in str(info.value) or "command line" in str(info.value)) and override in str(info.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["optim.lrr=1"])
    assert str(info.value).endswith("optim.lrr: unknown key; did you mean optim.lr=1?")


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nmodel:\n  max_dips: 192\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "did you mean model.max_disp?" in str(info.value)


def test_missing_config_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean stereo_v1"):
        load_config("stereo_v2")


def test_resolved_config_round_trips():
    cfg = load_config("stereo_v1", ["optim.lr=2e-4"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_cli_exits_2_with_message():
    proc = subprocess.run([sys.executable, "-m", "stereo", "config", "tiny", "optim.lrr=1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.lrr: unknown key; did you mean optim.lr=1?" in proc.stderr


def test_cli_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "stereo", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("train", "shards", "eval", "infer", "export", "bench", "compare", "submit", "metrics"):
        assert f"  {name} " in proc.stdout


def test_make_help_lists_targets_and_all_are_phony():
    proc = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, env=MAKE_ENV)
    assert proc.returncode == 0
    targets = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"setup", "test", "train", "submit", "eval", "compare", "bench", "shards", "docker-build"} <= set(targets)
    phony = " ".join(l for l in (REPO / "Makefile").read_text().replace("\\\n", " ").splitlines()
                     if l.startswith(".PHONY"))
    assert all(t in phony.split() for t in targets), "every listed target must be .PHONY"


def test_make_passes_dotted_assignments_as_overrides():
    proc = subprocess.run(["make", "-s", "config", "CONFIG=tiny", "optim.lr=0.25", "train.steps=9"],
                          cwd=REPO, capture_output=True, text=True, env=MAKE_ENV)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["optim"]["lr"] == 0.25 and resolved["train"]["steps"] == 9
