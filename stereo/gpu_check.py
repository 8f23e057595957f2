"""`make gpu-check`: a new GPU machine checked end to end by one prepared command, in about 8 minutes.

Each stage runs in its own process under a time limit; a stage that fails or runs out of time is recorded and the next
one runs. Everything lands in OUT (default runs/gpu-check): `summary.json` (every stage's verdict, figures and the end
of its log), one log per stage, and the stages' work (run directories, bench JSON) under OUT/work.

  steps     the model at the training crop (GPU: ViT-L, 320x736, 22 iterations, batch 4) through DeepSpeed ZeRO-2,
            20 steps on random data: outputs, loss and gradient norm finite at every step, and on a GPU
            torch.cuda.max_memory_allocated against the planner's peak for the same config (within 10 %)
  tests     the `gpu`-marked tests
  loop      configs/vitl_smoke.yaml through torchrun and the real training loop (ZeRO-2, bf16 on a GPU, every
            activation-checkpointing switch on): 4 steps with a checkpoint every 2, then resumed to step 6
  bench     `python -m stereo bench` (training at batch 2 and 4, inference 480x640 with 32 iterations), eager and
            compiled (train.compile=regions) side by side, with the compile seconds
  compiled  the compiled runner with the GRU iteration in mode="reduce-overhead" (CUDA graphs): captured, replayed,
            and timed against the bench stage's compiled rows
  released  with --released (a checkout of NVlabs/FoundationStereo) and --dinov2 (one of facebookresearch/dinov2):
            the released implementation (vitl, random weights, its autocast regions in bf16, AdamW on its trainable
            weights, the DepthAnything part frozen as in the paper) timed by the same bench code in the same command

While the GPU stages run, the planner's simulations the stages need are computed in parallel on the CPU cores.
`--device cpu` runs the same stages with the tiny model and small shapes (the `gpu` tests are only collected): how
the command is verified without a GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
SHAPES = {
    "cuda": dict(config="stereo_v1", crop=(320, 736), iters=22, batch=4, steps=20, bench=[], infer=(480, 640, 32)),
    "cpu": dict(config="tiny", crop=(64, 128), iters=2, batch=2, steps=3,
                bench=["--height", "64", "--width", "128", "--iters", "2", "--infer-height", "64",
                       "--infer-width", "128", "--infer-iters", "2", "--steps", "2", "--warmup", "1"],
                infer=(64, 128, 2)),
}
TINY_MODEL = ["model.size=tiny", "model.hidden_dims=[16,16,16]", "model.max_disp=64"]
CHECKPOINTING = [f"model.activation_checkpointing.{s}=true" for s in ("features", "cost_filtering", "update")]
# seconds per stage on a GPU (the CPU verification gets six times as long): the sum without `released` stays inside a
# 10-minute call; bench compiles the regions cold, compiled finds all but the CUDA-graph wrapper in Inductor's cache
LIMITS = {"steps": 100, "tests": 110, "loop": 150, "bench": 150, "compiled": 80, "released": 90}
PLAN_TOLERANCE = 0.10


def steps_config(device: str):
    from stereo.config import load_config

    shapes = SHAPES[device]
    h, w = shapes["crop"]
    return load_config(shapes["config"], [
        "deepspeed.zero_stage=2", "train.precision=auto", "train.ema_decay=null", f"data.batch_size={shapes['batch']}",
        f"augment.crop=[{h},{w}]", f"model.train_iters={shapes['iters']}"])


# --- stages that run in this module (in their own process) ---------------------------------------------------------

def stage_steps(device: str) -> dict:
    """DeepSpeed ZeRO-2 steps on random data: finite outputs, loss and gradients; measured peak against the plan."""
    import torch

    from stereo.model import build_model
    from stereo.model.precision import resolve_precision
    from stereo.train import engine as ds_engine
    from stereo.train.loss import stereo_loss

    cfg = steps_config(device)
    env = ds_engine.init_distributed()
    precision = resolve_precision(cfg.train.precision, env.device, "train.precision")
    torch.manual_seed(0)
    engine = ds_engine.build_engine(build_model(cfg.model), cfg, env, precision)
    b, (h, w), iters = cfg.data.batch_size, cfg.augment.crop, cfg.model.train_iters
    left = torch.rand(b, 3, h, w, device=env.device) * 255
    right = torch.roll(left, shifts=-8, dims=3)
    gt = torch.full((b, 1, h, w), 8.0, device=env.device)
    valid = torch.ones_like(gt, dtype=torch.bool)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    records = []
    for step in range(SHAPES[device]["steps"]):
        start = time.perf_counter()
        init_disp, preds = engine(left, right, iters=iters, test_mode=False)
        outputs_finite = bool(torch.isfinite(init_disp).all()) and all(bool(torch.isfinite(p).all()) for p in preds)
        loss = stereo_loss(init_disp, preds, gt, valid, cfg.model.max_disp, cfg.loss)["total"]
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        records.append({"step": step + 1, "seconds": time.perf_counter() - start, "loss": float(loss),
                        "grad_norm": grad_norm, "outputs_finite": outputs_finite,
                        "applied": bool(engine.was_step_applied())})
    finite = all(r["outputs_finite"] and r["applied"] and all(map(_finite, (r["loss"], r["grad_norm"])))
                 for r in records)
    result = {"config": cfg.name, "size": cfg.model.size, "crop": [h, w], "iters": iters, "batch": b,
              "precision": precision, "zero_stage": cfg.deepspeed.zero_stage, "finite": finite,
              "median_step_s": statistics.median(r["seconds"] for r in records[1:] or records), "steps": records}
    ok = finite
    if env.device.type == "cuda":
        from stereo.plan import local_gpu, make_plan

        plan = make_plan(cfg, env.world_size, local_gpu(env.device.index or 0))
        measured = torch.cuda.max_memory_allocated(env.device)
        result.update(measured_peak_gib=measured / GIB, planned_peak_gib=plan.peak_bytes / GIB,
                      planned_states_gib=plan.static_bytes / GIB, plan_error=measured / plan.peak_bytes - 1)
        ok = ok and abs(result["plan_error"]) <= PLAN_TOLERANCE
    result["ok"] = ok
    return result


def stage_released(official: Path, dinov2: Path) -> dict:
    """The released implementation in our bench: training at batch 2 and 4 and inference, bf16, one GPU."""
    import torch

    from stereo.bench import bench_infer, bench_train, model_config, simulated_work

    sys.path.insert(0, str(REPO / "tests"))
    from released_reference import build_released

    # The released autocast regions default to fp16 (torch.cuda.amp.autocast): run them in bf16, as ours.
    torch.cuda.amp.autocast = lambda enabled=True, dtype=torch.bfloat16, cache_enabled=True: torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_released(official, dinov2, size="vitl", mixed_precision=True).to(device)
    model.feature.dino.requires_grad_(False)  # the paper's frozen DepthAnything, as ours
    ours = model_config("vitl")  # the same work: FLOPs counted on ours (24.7 against the released 24.8 TFLOP)
    shapes = SHAPES["cuda"]
    h, w = shapes["crop"]
    result = {"implementation": "NVlabs/FoundationStereo", "checkout": str(official), "train": []}
    for batch in (2, 4):
        work = simulated_work(ours, batch, h, w, shapes["iters"], True, True, device)
        try:
            result["train"].append(bench_train(model, 416, batch, h, w, shapes["iters"], True, device, 10, 3, work,
                                               None))
        except torch.cuda.OutOfMemoryError:
            result["train"].append({"batch": batch, "oom": True})
            torch.cuda.empty_cache()
    ih, iw, iiters = shapes["infer"]
    work = simulated_work(ours, 1, ih, iw, iiters, False, True, device)
    result["infer"] = bench_infer(model, ih, iw, iiters, True, device, 10, 3, work, None)
    result["ok"] = True
    return result


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --- the plan cache, warmed in parallel ----------------------------------------------------------------------------

def plan_jobs(device: str) -> list[tuple]:
    """(model config, batch, crop, iters, precision, train, gpu, amp) of every simulation the stages ask for."""
    from stereo.bench import model_config
    from stereo.config import load_config

    if device != "cuda":
        return []
    cfg = steps_config(device)
    shapes = SHAPES[device]
    vitl = model_config("vitl")
    ih, iw, iiters = shapes["infer"]
    jobs = [(cfg.model, cfg.data.batch_size, tuple(cfg.augment.crop), cfg.model.train_iters, "bf16", True, True, False)]
    jobs += [(vitl, b, shapes["crop"], shapes["iters"], "bf16", True, True, True) for b in (2, 4)]
    jobs.append((vitl, 1, (ih, iw), iiters, "bf16", False, True, True))
    smoke = load_config("vitl_smoke", CHECKPOINTING)  # the memory check at the loop's start
    jobs.append((smoke.model, smoke.data.batch_size, tuple(smoke.augment.crop), smoke.model.train_iters, "bf16", True,
                 True, False))
    return jobs


def _simulate(job: tuple) -> None:
    from stereo.plan.budget import simulated_step

    cfg, batch, crop, iters, precision, train, gpu, amp = job
    simulated_step(cfg, batch, crop, iters, precision, train=train, gpu=gpu, amp=amp)


# --- the driver ----------------------------------------------------------------------------------------------------

def _commands(args: argparse.Namespace, work: Path) -> dict[str, list[list[str]] | str]:
    """Each stage's commands, or why it is skipped."""
    py, device = sys.executable, args.device
    shapes = SHAPES[device]
    this = [py, "-m", "stereo.gpu_check", "--device", device, "--out", str(args.out)]
    tiny = TINY_MODEL if device == "cpu" else []
    demo = work / "demo"  # a few demo scenes of its own: the full demo set takes a minute to write
    train = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "stereo", "train",
             "vitl_smoke", *tiny, *CHECKPOINTING, "logging.wandb=disabled", f"train.run_dir={work / 'vitl_smoke'}",
             f"data.train=[{{name: demo, shards: {demo / 'train'}}}]",
             f"data.val=[{{name: demo_val, shards: {demo / 'val'}}}]"]
    bench = [py, "-m", "stereo", "bench", *shapes["bench"]]
    cpu_backend = ["--backend", "aot_eager"]
    commands: dict[str, list[list[str]] | str] = {
        "steps": [this + ["--stage", "steps"]],
        # only the files with `gpu` tests: the others import what a bare GPU machine lacks (submitit, webdataset)
        "tests": [[py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   *sorted(str(p) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()),
                   *(["--collect-only"] if device == "cpu" else [])]],
        "loop": [[py, "-m", "stereo", "demo-data", "--out", str(demo), "--train", "16", "--val", "2",
                  "--workers", str(min(8, os.cpu_count() or 1))], train, train + ["train.steps=6"]],
        # a CPU checks the capture only (inductor's C++ code generation takes minutes on two cores)
        "bench": [bench + ["--out", str(work / "bench.json"), *([] if device == "cuda" else cpu_backend)]],
        "compiled": [bench + ["--runners", "compiled", "--steps", "5", "--warmup", "2",
                              "--out", str(work / "bench-compiled.json"),
                              *(["--iteration-mode", "reduce-overhead"] if device == "cuda"
                                else [*cpu_backend, "--no-train"])]],
        "released": "no --released checkout given (RELEASED=dir DINOV2=dir)",
    }
    if args.released:
        commands["released"] = [this + ["--stage", "released", "--released", str(args.released),
                                        "--dinov2", str(args.dinov2)]]
    return commands


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-chars:]


def _verdict(name: str, args: argparse.Namespace, work: Path, log: Path) -> tuple[bool, dict]:
    """What a stage established, from its files (a stage stopped by its limit may have left some)."""
    if name in ("steps", "released"):
        result = json.loads((args.out / f"{name}.json").read_text())
        return bool(result["ok"]), result
    if name == "loop":
        ckpts = work / "vitl_smoke" / "checkpoints"
        steps = sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if (p / "COMPLETE").is_file())
        resumed = "resumed" in log.read_text(errors="replace").rpartition("train.steps=6")[2]  # the second run's
        return resumed and steps[-1:] == [6], {"checkpoints": steps, "resumed": resumed}
    if name in ("bench", "compiled"):
        report = json.loads((work / f"{'bench' if name == 'bench' else 'bench-compiled'}.json").read_text())
        return True, report
    return True, {}


def drive(args: argparse.Namespace) -> int:
    out: Path = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    scale = 1 if args.device == "cuda" else 6
    warm = ProcessPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 2)),
                               mp_context=multiprocessing.get_context("spawn"))
    for job in plan_jobs(args.device):
        warm.submit(_simulate, job)
    summary: dict = {"device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}
    for name, commands in _commands(args, work).items():
        if args.only and name not in args.only:
            continue
        if isinstance(commands, str):
            summary["stages"][name] = {"status": "skipped", "why": commands}
            print(f"[gpu-check] {name}: skipped ({commands})", flush=True)
            continue
        log = out / f"{name}.log"
        start, deadline, status = time.perf_counter(), time.perf_counter() + LIMITS[name] * scale, "passed"
        with open(log, "w") as sink:
            for command in commands:
                sink.write(f"$ {' '.join(command)}\n")
                sink.flush()
                try:
                    done = subprocess.run(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                          timeout=max(1.0, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    status = f"timed out after {LIMITS[name] * scale} s"
                    break
                if done.returncode != 0:
                    status = f"exit {done.returncode}"
                    break
        record: dict = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
        try:
            ok, record["result"] = _verdict(name, args, work, log)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            ok, record["result"] = False, {"error": repr(exc)}
        if status == "passed" and not ok:
            record["status"] = "failed"
        record["log_tail"] = _tail(log)
        summary["stages"][name] = record
        print(f"[gpu-check] {name}: {record['status']} in {record['seconds']} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    warm.shutdown(wait=False, cancel_futures=True)
    failed = [n for n, r in summary["stages"].items() if r["status"] not in ("passed", "skipped")]
    print(f"[gpu-check] {'all stages passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"see {out / 'summary.json'}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m stereo.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--released", type=Path, help="checkout of NVlabs/FoundationStereo")
    parser.add_argument("--dinov2", type=Path, help="checkout of facebookresearch/dinov2 (with --released)")
    parser.add_argument("--only", nargs="+", choices=list(LIMITS), help="run only these stages")
    parser.add_argument("--stage", choices=["steps", "released"], help=argparse.SUPPRESS)  # one stage, in-process
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.released and not args.dinov2:
        parser.error("--released needs --dinov2 (the released DepthAnything loads DINOv2 through torch.hub)")
    if args.stage:
        result = stage_steps(args.device) if args.stage == "steps" else stage_released(args.released, args.dinov2)
        (args.out / f"{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
