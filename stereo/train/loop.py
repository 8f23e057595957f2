"""The training loop. `train(cfg, overrides, context)` reads top to bottom: setup, resume, steps, checkpoints, exit.

One optimizer step = `train.grad_accum` micro-batches. A micro-batch whose loss is not finite on any rank is
dropped on every rank (no backward, no update, no EMA) and counted; `train.max_bad_steps` in a row stop the run.
A step whose gradients are not finite is skipped and counted the same way (DeepSpeed's check under ZeRO and fp16,
stereo.train.engine.GuardedAdamW at stage 0). Failures leave through stereo.train.failures (one exit path).
What follows each step (log, image, validate, early stop, agree on signals, save, stop) is stereo.train.step_end.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from stereo import exitcodes
from stereo.config import Config
from stereo.model.precision import resolve_precision
from stereo.progress import TrainProgress
from stereo.train import compile as compiling
from stereo.train import engine as ds_engine
from stereo.train.checkpoint import CheckpointManager
from stereo.train.early_stop import EarlyStop
from stereo.train.ema import EMA
from stereo.train.failures import ExitContext
from stereo.train.logging import RunLogger
from stereo.train.loss import stereo_loss
from stereo.train.batches import batches_forever, started
from stereo.train.metrics_window import Window
from stereo.train.rng import seed_everything, seed_micro_batch, set_rng_state
from stereo.train.run_state import RunState
from stereo.train.sample_log import SampleLog
from stereo.train.schedules import lr_multiplier
from stereo.train.signals import TrainerSignals
from stereo.train.startup import StartupClock, open_run_dir
from stereo.train.step_end import StepEnd
from stereo.train.validation import Validator


def train(cfg: Config, overrides: list[str], context: ExitContext) -> int:
    from stereo.data.loader import build_train_loader
    from stereo.model import build_model
    from stereo.model.io import initialise

    clock = StartupClock()
    env = ds_engine.init_distributed()
    context.rank = env.rank
    signals = TrainerSignals(env.rank).install()
    clock.mark("process_group")
    run = open_run_dir(cfg, context)  # lock, config check against the checkpoint, this start's config
    log = RunLogger(run.path, cfg, overrides, run.git_revision, env.rank)  # before seeding: wandb draws numbers
    context.cleanups.append(log.finish)
    seed_everything(cfg.train.seed, env.rank)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    precision = resolve_precision(cfg.train.precision, env.device, "train.precision")
    ckpts = CheckpointManager(run.path, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, env.rank)
    clock.mark("run_dir")

    model = build_model(cfg.model)
    if ckpts.latest() is None:  # resuming beats model.init_from: the checkpoint has every weight
        initialise(model, cfg.model)
    clock.mark("model_build")
    engine = ds_engine.build_engine(model, cfg, env, precision)
    engine.module.train()  # applies model.freeze_bn (a module starts in training mode without calling train())
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
    compiled = compiling.enabled(cfg, env.device)
    loss_fn = compiling.compile_training(engine.module, cfg, run.path) if compiled else stereo_loss
    clock.mark("deepspeed_init")
    # the newest checkpoint that verifies, else an older one, saying why; moved here from another world size
    resumed = ckpts.resume(engine, cfg.train.seed, ema)
    clock.mark("checkpoint_load")
    loader = build_train_loader(cfg.data, cfg.augment, cfg.model.max_disp, env.rank, env.world_size,
                                cfg.train.grad_accum)
    state, saved = RunState(), resumed[1] if resumed else None
    if saved is not None:
        state = RunState.restore(saved, env.world_size, resumed[0])
        loader.load_state_dict(saved["loader"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
    log.truncate_after(state.step if saved is not None else -1)
    samples = SampleLog(run.path, env.rank, cfg.logging.sample_keys)
    samples.truncate_after(state.step if saved is not None else -1)
    log.record_config_changes(state.step, run.changes)
    validator = Validator(cfg, engine.module, ema, env, log)
    early_stop = EarlyStop(cfg.early_stop, run.path, env.rank)
    if state.step == 0:
        early_stop.at(0, validator.run(0, "before"))  # checks the metric's name; no rung at step 0
        clock.mark("validation")
    # started before the RNG restore: starting torch's DataLoader draws a seed from the global RNG
    batches = started(batches_forever(loader, env.device))
    if saved is not None:
        set_rng_state(saved["rng"])
    clock.mark("loader_start")

    progress = TrainProgress(cfg.train.steps, state.step, enabled=env.rank == 0)
    first_step = state.step + 1
    window = Window()
    end_step = StepEnd(cfg, env.rank, run.git_revision, state, engine, loader, ema, window, log, progress, validator,
                       early_stop, signals, ckpts)
    exit_code = exitcodes.OK
    while state.step < cfg.train.steps:
        lr = ds_engine.set_learning_rate(engine, lr_multiplier(state.step, cfg.train.steps, cfg.schedule))
        good = 0
        while good < cfg.train.grad_accum:  # a dropped micro-batch is replaced by the next one
            wait_start = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - wait_start
            seed_micro_batch(cfg.train.seed, batch["origin"])
            init_disp, preds = engine(batch["left"], batch["right"], iters=cfg.model.train_iters, test_mode=False)
            terms = loss_fn(init_disp, preds, batch["disp"], batch["valid"], cfg.model.max_disp, cfg.loss)
            if signals.agree(~torch.isfinite(terms["total"].detach())).bad_loss:
                state.count_bad_step(env.rank, "non-finite loss")
                if state.bad_streak >= cfg.train.max_bad_steps:
                    break
                continue
            engine.backward(terms["total"])
            engine.step()
            good += 1
            samples.add(batch["keys"])
            window.add(terms, batch["left"].shape[0] * env.world_size)
        if state.bad_streak >= cfg.train.max_bad_steps:
            print(f"[rank {env.rank}] stopping: {state.bad_streak} non-finite steps in a row at step {state.step + 1} "
                  f"(train.max_bad_steps={cfg.train.max_bad_steps}); the newest checkpoint is "
                  f"{ckpts.latest() or 'none yet'}", file=sys.stderr, flush=True)
            exit_code = exitcodes.TOO_MANY_BAD_STEPS
            break
        if engine.was_step_applied():
            state.bad_streak = 0
            if ema is not None:
                ema.update()
        else:
            state.count_bad_step(env.rank, "non-finite gradients (the update was skipped)")
        state.step += 1
        samples.step_done(state.step)
        state.samples_seen += cfg.data.batch_size * cfg.train.grad_accum * env.world_size
        if state.step == first_step:
            clock.mark("first_step")
            log.startup(state.step, clock.summary(run, resumed, loader.epochs()), clock.seconds)
            if compiled:  # compiled in the first step; a later change of these counts is a recompilation
                log.log(state.step, {f"compile/{k}": v for k, v in compiling.stats().items()})
        stop = end_step(lr, batch, preds[-1])
        if stop is not None:
            exit_code = stop
            break
    progress.close()
    signals.uninstall()
    if exit_code == exitcodes.OK and state.step == cfg.train.steps:
        validator.run(state.step, "after")
        validator.print_summary()
    if compiled:
        log.log(state.step, {f"compile/{k}": v for k, v in compiling.stats().items()})
    log.finish(exit_code)  # before the closing lines, which wandb's summary would otherwise bury
    progress.done(exit_code, run.path, ckpts.latest(), cfg)
    if dist.is_initialized():
        dist.barrier()
    return exit_code
