"""Typed configuration: one small dataclass per component.

Every field has a default so that a YAML file only states what differs. `validate()` checks value ranges
that a type alone cannot express; the loader (`stereo.config.load`) checks keys and types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stereo.config.errors import ConfigError


@dataclass
class ActivationCheckpointing:
    """Recompute these parts in the backward pass instead of storing their activations."""

    features: bool = False  # EdgeNeXt branch, fusion decoder, context network
    cost_filtering: bool = False  # hourglass + disparity transformer
    update: bool = False  # every GRU iteration


@dataclass
class PretrainedConfig:
    """Local files that initialise the backbones when training from scratch (nothing is downloaded)."""

    depth_anything: str | None = None  # depth_anything_v2_vit{s,b,l}.pth
    edgenext: str | None = None  # timm edgenext_small ImageNet weights (.pth or .safetensors)
    # A frozen ViT that was never initialised gives random features forever: refused unless this is set (demo only).
    allow_random_vit: bool = False


@dataclass
class ModelConfig:
    size: Literal["tiny", "vits", "vitb", "vitl"] = "vitl"
    max_disp: int = 416  # full-resolution pixels; the cost volume has max_disp/4 bins
    train_iters: int = 22
    valid_iters: int = 32
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    corr_radius: int = 4
    corr_levels: int = 2
    freeze_vit: bool = True  # the DepthAnything-V2 part; unfreeze for full fine-tuning (see optim.vit_lr)
    # BatchNorm layers keep their running statistics (eval mode) while training, as RAFT-Stereo fine-tunes;
    # small per-GPU batches of a new domain otherwise drift the statistics the released weights were tuned with
    freeze_bn: bool = False
    init_from: str | None = None  # a released model_best_bp2.pth or one of our exports
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    activation_checkpointing: ActivationCheckpointing = field(default_factory=ActivationCheckpointing)
    channels_last: bool = False

    def validate(self) -> None:
        if self.max_disp % 16 or self.max_disp <= 0:
            raise ConfigError("model.max_disp", f"a positive multiple of 16, got {self.max_disp}")
        if len(self.hidden_dims) != 3:
            raise ConfigError("model.hidden_dims", f"three widths (1/4, 1/8, 1/16), got {self.hidden_dims}")
        for key in ("train_iters", "valid_iters", "corr_radius", "corr_levels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", f">= 1, got {getattr(self, key)}")


@dataclass
class DatasetSpec:
    """One data set of the training mix: where its shards are and how often it is drawn."""

    name: str = ""
    shards: str = ""  # a directory with manifest.json, a brace pattern, a list file, or a `pipe:` command
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    val: list[DatasetSpec] = field(default_factory=list)
    batch_size: int = 4  # per GPU (per process)
    num_workers: int = 4  # a count dividing lane_blocks x batch_size x train.grad_accum is used in full
    # The job's sample order has lane_blocks x global batch lanes (stereo.data.loader.TrainLoader); more blocks let
    # more loader workers share a rank's lanes. Fixed for the life of a run (it defines the order).
    lane_blocks: int = 1
    seed: int = 0
    max_bad_sample_rate: float = 0.01  # above this fraction of bad samples in a shard, stop with an error
    val_samples: int | None = None  # cap on validation samples (None: all held-out samples)
    # remote (s3://, http(s)://) and pipe: shards; endpoint and credentials come from the environment only
    shard_retries: int = 5  # failed reads in a row (without progress) before a shard counts as failed
    retry_backoff_s: float = 1.0  # wait before the first retry, doubled for each further one (at most 60 s)
    read_timeout_s: float = 60.0  # a remote read that receives no byte for this long is stalled: reconnected
    max_failed_shard_rate: float = 0.05  # stop when more shards than this share (and more than one) failed
    cache_dir: str | None = None  # node-local copy of remote shards read once (None: no cache)
    cache_gb: float = 100.0  # the cache's size bound

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size", f">= 1, got {self.batch_size}")
        if not 0.0 <= self.max_bad_sample_rate <= 1.0:
            raise ConfigError("data.max_bad_sample_rate", f"a rate in [0, 1], got {self.max_bad_sample_rate}")
        if self.val_samples is not None and self.val_samples < 1:
            raise ConfigError("data.val_samples", f">= 1 or null, got {self.val_samples}")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", f">= 0, got {self.num_workers}")
        if self.lane_blocks < 1:
            raise ConfigError("data.lane_blocks", f">= 1, got {self.lane_blocks}")
        if self.shard_retries < 0:
            raise ConfigError("data.shard_retries", f">= 0, got {self.shard_retries}")
        if self.retry_backoff_s < 0:
            raise ConfigError("data.retry_backoff_s", f">= 0 seconds, got {self.retry_backoff_s}")
        if self.read_timeout_s <= 0:
            raise ConfigError("data.read_timeout_s", f"> 0 seconds, got {self.read_timeout_s}")
        if not 0.0 <= self.max_failed_shard_rate <= 1.0:
            raise ConfigError("data.max_failed_shard_rate", f"a rate in [0, 1], got {self.max_failed_shard_rate}")
        if self.cache_gb <= 0:
            raise ConfigError("data.cache_gb", f"> 0, got {self.cache_gb}")
        for split in ("train", "val"):
            for i, spec in enumerate(getattr(self, split)):
                if not spec.shards:
                    raise ConfigError(f"data.{split}[{i}].shards", "a shard location, got nothing")
                if spec.weight <= 0:
                    raise ConfigError(f"data.{split}[{i}].weight", f"> 0, got {spec.weight}")


@dataclass
class AugmentConfig:
    """Training augmentation; defaults follow RAFT-Stereo's augmentor, which the paper points to."""

    crop: list[int] = field(default_factory=lambda: [320, 736])  # H, W
    spatial_prob: float = 1.0
    scale: list[float] = field(default_factory=lambda: [-0.2, 0.4])  # log2 of the random zoom
    stretch_prob: float = 0.8
    max_stretch: float = 0.2  # log2 of the extra horizontal/vertical factor
    yjitter: int = 2  # right view shifted by up to this many rows (imperfect rectification)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: list[float] = field(default_factory=lambda: [0.0, 1.4])
    hue: float = 0.5 / 3.14159
    gamma: list[float] = field(default_factory=lambda: [1.0, 1.0])  # range of the random gamma
    asymmetric_color_prob: float = 0.2
    eraser_prob: float = 0.5
    # swaps the views; needs a right-view disparity (Scene Flow, Middlebury 2014, CREStereo, FallingThings,
    # InStereo2K, Virtual KITTI 2, the demo): FSD, KITTI, ETH3D, Sintel and MiddEval3 are never flipped (logged)
    hflip_prob: float = 0.0
    vflip_prob: float = 0.0

    def validate(self) -> None:
        if len(self.crop) != 2 or any(c <= 0 or c % 32 for c in self.crop):
            raise ConfigError("augment.crop", f"[H, W], each a positive multiple of 32, got {self.crop}")
        for key in ("spatial_prob", "stretch_prob", "asymmetric_color_prob", "eraser_prob", "hflip_prob", "vflip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"augment.{key}", f"a probability in [0, 1], got {getattr(self, key)}")
        for key in ("max_stretch", "yjitter", "brightness", "contrast"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}", f">= 0, got {getattr(self, key)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError("augment.hue", f"in [0, 0.5], got {self.hue}")
        for key in ("scale", "saturation", "gamma"):
            bounds = getattr(self, key)
            if len(bounds) != 2 or bounds[0] > bounds[1] or (key != "scale" and bounds[0] < 0):
                raise ConfigError(f"augment.{key}", f"[low, high] with low <= high{'' if key == 'scale' else ', >= 0'}"
                                  f", got {bounds}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    vit_lr: float = 1e-5  # used only when model.freeze_vit is false
    grad_clip: float = 1.0  # global norm; 0 disables

    def validate(self) -> None:
        for key in ("lr", "vit_lr", "eps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"optim.{key}", f"> 0, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}", f">= 0 ({'0 disables it' if key == 'grad_clip' else 'none'}), "
                                  f"got {getattr(self, key)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("optim.betas", f"[beta1, beta2], each in [0, 1), got {self.betas}")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier as a pure function of the step (see stereo.train.schedules)."""

    kind: Literal["step", "cosine", "onecycle", "constant"] = "step"
    warmup_steps: int = 0
    decay_at: float = 0.8  # step: fraction of training after which lr is multiplied by decay_factor
    decay_factor: float = 0.1
    min_ratio: float = 0.0  # cosine: final lr / peak lr
    pct_start: float = 0.3  # onecycle: fraction spent rising

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("schedule.warmup_steps", f">= 0 (0: no warmup), got {self.warmup_steps}")
        for key in ("decay_at", "min_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"schedule.{key}", f"in [0, 1], got {getattr(self, key)}")
        if self.decay_factor < 0:
            raise ConfigError("schedule.decay_factor", f">= 0, got {self.decay_factor}")
        if not 0.0 < self.pct_start < 1.0:
            raise ConfigError("schedule.pct_start", f"in (0, 1), got {self.pct_start}")


@dataclass
class LossConfig:
    """Paper Eq. 11: init_weight * L_init(d0) + sum_i gamma^(N-1-i) * L_seq(d_i)."""

    init_kind: Literal["smooth_l1", "l1", "epe"] = "smooth_l1"
    seq_kind: Literal["smooth_l1", "l1", "epe"] = "l1"
    init_weight: float = 1.0
    gamma: float = 0.9
    rescale_gamma: bool = False  # RAFT-Stereo: gamma ** (15 / (N - 1))

    def validate(self) -> None:
        if self.init_weight < 0:
            raise ConfigError("loss.init_weight", f">= 0, got {self.init_weight}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError("loss.gamma", f"in (0, 1], got {self.gamma}")


@dataclass
class TrainConfig:
    steps: int = 200_000
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 0
    ema_decay: float | None = 0.9999  # None disables the EMA
    val_every: int = 5000
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    run_dir: str | None = None  # default: runs/<config name>-<timestamp>
    # resume even though keys other than the cadences changed since the checkpoint (docs/training.md#resume)
    allow_config_change: bool = False
    cudnn_benchmark: bool = False  # cuDNN autotuning: faster steps, a slower first step at every (re)start
    # torch.compile of the feature and context networks, one GRU iteration and the loss, each on its own
    # (docs/performance.md#compilation); auto: regions on a GPU, off on a CPU (compiling there costs more than it saves)
    compile: Literal["auto", "off", "regions"] = "auto"
    # inductor generates fused code; aot_eager captures the same graphs (forward and backward) and runs them eagerly:
    # a check of the capture without code generation (seconds instead of minutes on a CPU)
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # Inductor's and the FX graph caches, shared by every start of every run (a requeue compiles nothing it compiled
    # before); default <the run directory's parent>/compile-cache. On a cluster: a shared file system.
    compile_cache: str | None = None
    # On a GPU (train start) and at submit: refuse a config whose planned peak memory exceeds the GPU's (`make plan`);
    # false starts it anyway
    check_memory: bool = True

    def validate(self) -> None:
        for key in ("steps", "grad_accum", "val_every", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f">= 1, got {getattr(self, key)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay", f"in (0, 1) or null, got {self.ema_decay}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage", f"0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer", "zero_stage 1, 2 or 3 (ZeRO-0 has no partition to "
                              "offload), or false")
        if self.fp16_initial_scale_power < 0:
            raise ConfigError("deepspeed.fp16_initial_scale_power", f">= 0, got {self.fp16_initial_scale_power}")
        if self.fp16_loss_scale_window < 1:
            raise ConfigError("deepspeed.fp16_loss_scale_window", f">= 1, got {self.fp16_loss_scale_window}")


@dataclass
class CheckpointConfig:
    every: int = 5000
    keep_last: int = 3
    keep_every: int | None = None  # additionally keep every M-th step forever

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("checkpoint.every", f">= 1 (steps between checkpoints), got {self.every}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError("checkpoint.keep_every", f">= 1 or null, got {self.keep_every}")
        if self.keep_last < 2:
            raise ConfigError("checkpoint.keep_last", f">= 2 (a crash while writing must leave one), got {self.keep_last}")


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY is set
    project: str = "foundation-stereo"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    every: int = 20
    image_every: int = 1000  # 0: no training pictures
    wandb_init_timeout_s: int = 30  # a wandb that cannot start in time is skipped (metrics.jsonl has everything)
    mlflow: bool = False  # an MLflow run beside (or instead of) wandb; experiment = logging.project
    mlflow_tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db (SQLite, no server)
    mlflow_timeout_s: int = 10  # per request to an MLflow server; one that does not answer is skipped
    sample_keys: bool = False  # RUN_DIR/samples/rank{r}.jsonl: the keys of the samples each rank trained on, per step

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError("logging.every", f">= 1, got {self.every}")
        if self.mlflow_tracking_uri is not None and ":" not in self.mlflow_tracking_uri:
            raise ConfigError("logging.mlflow_tracking_uri", "a URI such as http://host:5000 or "
                              f"sqlite:///path/mlflow.db, got {self.mlflow_tracking_uri!r}")
        for key in ("image_every", "wandb_init_timeout_s", "mlflow_timeout_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"logging.{key}", f">= 0, got {getattr(self, key)}")


@dataclass
class SlurmConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: int | None = None
    time_min: int = 240
    constraint: str | None = None
    gpu: str = "h100-80gb"  # the partition's GPU model: what submit checks the planned memory against (`make plan`)
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    signal_delay_s: int = 120
    max_requeues: int = 20
    container_image: str | None = None
    container_runtime: Literal["pyxis", "apptainer", "docker"] = "pyxis"
    container_mounts: list[str] = field(default_factory=list)  # host paths (the data root) mounted at the same path
    folder: str = "runs/slurm"

    def validate(self) -> None:
        from stereo.plan.gpus import GPUS

        if self.gpu not in GPUS:
            raise ConfigError("slurm.gpu", f"one of {', '.join(GPUS)}, got {self.gpu!r}")
        for key, least in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("time_min", 1),
                           ("signal_delay_s", 1), ("max_requeues", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"slurm.{key}", f">= {least}, got {getattr(self, key)}")
        if self.mem_gb is not None and self.mem_gb < 1:
            raise ConfigError("slurm.mem_gb", f">= 1 or null, got {self.mem_gb}")
        if self.signal_delay_s >= 60 * self.time_min:
            raise ConfigError("slurm.signal_delay_s", f"less than slurm.time_min={self.time_min} minutes (the stop "
                              f"signal comes this long before the time limit), got {self.signal_delay_s} s")
        for path in self.container_mounts:
            if not path.startswith("/"):
                raise ConfigError("slurm.container_mounts", f"absolute host paths, got {path!r}")


@dataclass
class EvalConfig:
    benchmark: str | None = None
    data: str | None = None
    iters: int | None = None  # default: model.valid_iters
    max_disp: int | None = None  # opt-in cap on evaluated ground truth; None: every valid pixel counts
    save_images: bool = True

    def validate(self) -> None:
        for key in ("iters", "max_disp"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"eval.{key}", f">= 1 or null, got {getattr(self, key)}")


@dataclass
class EarlyStopConfig:
    """Asynchronous successive halving among the runs that share `ledger` (stereo/train/early_stop.py): at each rung
    step a run records its validation metric there and stops unless it ranks within the best 1/eta so far. A sweep
    sets it for its trials (docs/sweeps.md)."""
    ledger: str | None = None  # a directory the competing runs share; None: no early stopping
    rungs: list[int] = field(default_factory=list)  # the steps where runs are compared (validation steps)
    eta: int = 2
    metric: str = "val/epe/pooled"
    direction: Literal["min", "max"] = "min"

    def validate(self) -> None:
        if any(r < 1 for r in self.rungs) or self.rungs != sorted(set(self.rungs)):
            raise ConfigError("early_stop.rungs", f"increasing steps >= 1, got {self.rungs}")
        if self.eta < 2:
            raise ConfigError("early_stop.eta", f">= 2 (the best 1/eta continue), got {self.eta}")
        if not self.metric.startswith("val/"):
            raise ConfigError("early_stop.metric", f"a validation metric (val/...), got {self.metric!r}")
        if self.ledger is not None and not self.rungs:
            raise ConfigError("early_stop.rungs", "at least one step where runs are compared")


@dataclass
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def validate(self) -> None:
        """What no single section can check."""
        stop = self.early_stop
        if stop.ledger is None:
            return
        if not self.data.val:
            raise ConfigError("early_stop.ledger", "a run that validates (data.val is empty)")
        for rung in stop.rungs:
            if rung >= self.train.steps or rung % self.train.val_every:
                raise ConfigError("early_stop.rungs", f"validation steps before the last (multiples of "
                                  f"train.val_every={self.train.val_every} below train.steps={self.train.steps}), "
                                  f"got {rung}")
