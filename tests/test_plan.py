"""The memory planner: its simulated activation memory against a real CPU step's allocations (torch.profiler's
allocator records), linear growth with the batch, the `plan` command, and the memory check that stops `submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from stereo.cli import main
from stereo.config import load_config
from stereo.config.schema import LossConfig, ModelConfig
from stereo.model import build_model
from stereo.plan import GPUS, check_fits
from stereo.plan.budget import DEEPSPEED_REDUCE_BUCKET, model_states
from stereo.plan.simulate import simulate_step
from stereo.train.loss import stereo_loss

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def measured_cpu_step(cfg: ModelConfig, batch: int, height: int, width: int, iters: int) -> tuple[int, int]:
    """(bytes live after forward + loss, highest live bytes) of a real fp32 CPU training step, above what existed
    before it, from the allocation records of torch.profiler. A first step creates the gradients, so that the measured
    one accumulates into them (the planner counts them with the model states)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()

    def step() -> None:
        with record_function("forward"):
            left = torch.rand(batch, 3, height, width) * 255
            right = torch.rand(batch, 3, height, width) * 255
            gt = torch.rand(batch, 1, height, width) * (cfg.max_disp - 2) + 1
            valid = gt > 0
            init_disp, preds = model(left, right, iters=iters)
            loss = stereo_loss(init_disp, preds, gt, valid, cfg.max_disp, LossConfig())["total"]
            del init_disp, preds
        loss.backward()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    forward_end = max(e.end_ns() for e in events if e.name() == "forward")
    live = peak = kept = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.start_ns() > forward_end and not kept:
            kept = live
        live += event.nbytes()
        peak = max(peak, live)
    return kept, peak


TINY = dict(size="tiny", max_disp=64, hidden_dims=[16, 16, 16])


@pytest.mark.parametrize("model, checkpointing, batch, crop, iters", [
    (TINY, False, 2, (96, 160), 3),
    (TINY, True, 2, (96, 160), 3),  # every activation-checkpointing switch on
    (dict(size="vits", max_disp=192), False, 1, (64, 96), 2),
])
def test_planned_activations_match_a_real_cpu_step(model, checkpointing, batch, crop, iters):
    cfg = ModelConfig(**model)
    for switch in ("features", "cost_filtering", "update"):
        setattr(cfg.activation_checkpointing, switch, checkpointing)
    kept, peak = measured_cpu_step(cfg, batch, *crop, iters)
    planned = simulate_step(cfg, batch, *crop, iters, "fp32")
    assert planned.kept_bytes == pytest.approx(kept, rel=0.15)
    assert planned.peak_bytes == pytest.approx(peak, rel=0.15)
    if checkpointing:  # recomputation costs FLOPs and saves memory, and the plan sees both
        plain = simulate_step(ModelConfig(**model), batch, *crop, iters, "fp32")
        assert planned.kept_bytes < 0.5 * plain.kept_bytes and planned.flops > plain.flops


@pytest.fixture(scope="module")
def tiny_bf16_gpu_rules():
    return simulate_step(ModelConfig(**TINY), 1, 64, 128, 2, "bf16", gpu=True)


def test_activations_grow_linearly_with_the_batch(tiny_bf16_gpu_rules):
    """What the largest-batch figure extrapolates from."""
    one = tiny_bf16_gpu_rules
    three = simulate_step(ModelConfig(**TINY), 3, 64, 128, 2, "bf16", gpu=True)
    assert three.kept_bytes == pytest.approx(3 * one.kept_bytes, rel=0.03)
    assert three.peak_bytes == pytest.approx(3 * one.peak_bytes, rel=0.03)
    assert three.flops == pytest.approx(3 * one.flops, rel=0.01)


def test_gpu_autocast_rules_keep_norms_and_softmax_in_fp32(tiny_bf16_gpu_rules):
    """CUDA autocast runs layer norm and softmax in fp32 where CPU autocast keeps bf16: the GPU plan holds more."""
    cpu_rules = simulate_step(ModelConfig(**TINY), 1, 64, 128, 2, "bf16")
    assert tiny_bf16_gpu_rules.kept_bytes > cpu_rules.kept_bytes
    fp32 = simulate_step(ModelConfig(**TINY), 1, 64, 128, 2, "fp32")
    assert tiny_bf16_gpu_rules.kept_bytes < 0.75 * fp32.kept_bytes


def test_model_states_follow_the_zero_stage():
    import deepspeed.runtime.zero.config as zero_config

    assert DEEPSPEED_REDUCE_BUCKET == zero_config.DeepSpeedZeroConfig().reduce_bucket_size
    trainable, frozen, n = 1_000_000, 3_000_000, 4
    stages = [model_states(trainable, frozen, "bf16", stage, n, ema=True) for stage in range(4)]
    assert stages[0]["optimizer states"] == 4 * trainable  # DeepSpeed's bf16 without ZeRO: bf16 moments
    assert stages[1]["optimizer states"] == 16 * trainable // n  # fp32 master, its gradient, two moments
    assert stages[1]["gradients"] == 2 * trainable + 2 * DEEPSPEED_REDUCE_BUCKET
    assert stages[2]["gradients"] == 2 * trainable // n + 2 * DEEPSPEED_REDUCE_BUCKET
    assert stages[3]["gradients"] == 2 * trainable // n  # no ZeRO-1/2 bucket
    assert stages[3]["frozen weights"] == 2 * frozen // n and stages[2]["frozen weights"] == 2 * frozen
    assert stages[3]["EMA"] == 4 * trainable // n and stages[2]["EMA"] == 4 * trainable
    assert model_states(trainable, frozen, "bf16", 1, n, ema=False)["EMA"] == 0
    offloaded = model_states(trainable, frozen, "bf16", 2, n, ema=True, offload=True)
    assert offloaded["optimizer states"] == 0 and offloaded["gradients"] == stages[2]["gradients"]


def test_plan_command_prints_each_part_the_largest_batch_and_a_time_floor(capsys):
    args = ["plan", "tiny", "augment.crop=[64,128]", "deepspeed.zero_stage=2", "--gpu", "h100-80gb", "--gpus", "4"]
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world_size"] == 4 and plan["zero_stage"] == 2 and plan["precision"] == "fp32"  # tiny.yaml: fp32
    assert list(plan["states"]) == ["frozen weights", "trainable weights", "gradients", "optimizer states", "EMA"]
    assert plan["peak_bytes"] == plan["static_bytes"] + plan["step_peak_bytes"] and plan["fits"]
    per_sample = plan["step_peak_bytes"] / plan["batch"]
    assert plan["static_bytes"] + plan["max_batch"] * per_sample <= plan["usable_bytes"] \
        < plan["static_bytes"] + (plan["max_batch"] + 1) * per_sample
    assert plan["time_floor_s"] == pytest.approx(plan["flops"] / (989e12 / 2))  # fp32: TF32 at half the bf16 peak
    assert main(args) == 0  # the same plan as text, from the cache
    text = capsys.readouterr().out
    for line in ("optimizer states", "activations per sample", "largest batch per GPU that fits:", "time floor"):
        assert line in text
    assert f"largest batch per GPU that fits: {plan['max_batch']}" in text and "host memory" not in text
    assert "(the step's simulation read from ~/.cache/stereo/plans, where a plan made it in" in text
    assert "+ 1.86 GiB of ZeRO-2's reduce bucket, 500,000,000 elements whatever the model's size)" in text  # fp32

    assert main(args[:3] + ["deepspeed.offload_optimizer=true"] + args[3:] + ["--json"]) == 0  # the fp32 partition moves to the host
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["states"]["optimizer states"] == 0 and offloaded["host_bytes"] == plan["states"]["optimizer states"]
    assert offloaded["max_batch"] >= plan["max_batch"]


def test_check_fits_plans_a_fitting_config_and_is_skipped_when_switched_off():
    cfg = load_config("tiny", ["augment.crop=[64,128]"])
    plan = check_fits(cfg, 1, GPUS["a100-40gb"])
    assert plan is not None and plan.fits
    assert check_fits(load_config("tiny", ["train.check_memory=false"]), 1, GPUS["a100-40gb"]) is None


def test_submit_refuses_a_config_whose_plan_exceeds_the_gpu(tmp_path):
    """About 1 GiB per tiny sample at 320x736: 64 per GPU cannot fit an A100 40GB. Nothing reaches Slurm or disk."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stereo", "submit", "--no-check-paths", "tiny", "slurm.gpus_per_node=1",
                           "slurm.gpu=a100-40gb", "data.batch_size=64", "augment.crop=[320,736]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert message.startswith("config error:") and len(message.splitlines()) == 1
    for words in ("data.batch_size", "planned peak", "a100-40gb", "largest batch that fits is",
                  "train.check_memory=false"):
        assert words in message
    assert not (tmp_path / "runs").exists()


def test_slurm_gpu_names_a_known_gpu():
    from stereo.config.errors import ConfigError

    with pytest.raises(ConfigError, match="slurm.gpu: one of h100-80gb"):
        load_config("tiny", ["slurm.gpu=h100"])


@pytest.mark.gpu
def test_train_on_a_gpu_refuses_a_config_over_its_memory(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    batch = int(memory_gib) + 8  # about 1 GiB per tiny sample at this crop
    done = subprocess.run([sys.executable, "-m", "stereo", "train", "tiny", f"data.batch_size={batch}",
                           "augment.crop=[320,736]", f"train.run_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "planned peak" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_make_plan_bench_and_gpu_check_pass_their_arguments():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}

    def dry_run(*args: str) -> str:
        done = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        return " ".join(word for word in done.stdout.split() if word != "\\")  # joined continuation lines

    assert "-m stereo plan stereo_v1 'data.batch_size=2' --gpu h200-141gb --gpus 8" in dry_run(
        "plan", "CONFIG=stereo_v1", "data.batch_size=2", "GPU=h200-141gb", "GPUS=8")
    assert "-m stereo bench --out" in dry_run("bench")  # the size that fits the device found
    assert "-m stereo bench --size vits --out" in dry_run("bench", "SIZE=vits")
    assert "-m stereo.gpu_check --released /r --dinov2 /d" in dry_run(
        "gpu-check", "RELEASED=/r", "DINOV2=/d")
