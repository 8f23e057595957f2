"""A training step (or an inference) of the model run on fake tensors: its FLOPs, operators and memory, measured.

Fake tensors (torch's FakeTensorMode) carry shapes, dtypes and storages but no data, so the full ViT-L step at the
training crop runs on a CPU in seconds without allocating its tens of GiB. While it runs, `LiveBytes` plays the
allocator: every storage an operator creates counts from its creation until autograd, the model or the loss lets go of
it, so the tensors saved for backward (and those kept alive by activation checkpointing's recomputation) count exactly
as long as they live. The step runs in the precision training runs in: with bf16 or fp16 the weights are cast as
DeepSpeed casts them, and the model's own autocast takes over (`FoundationStereo._weights_autocast`).

Autocast: fake tensors here live on the CPU (a CPU-only torch cannot even index a fake CUDA tensor), and CPU autocast
keeps some operators in bf16 that CUDA autocast runs in fp32 (layer norm, softmax, sums, norms, exp, ...). For a GPU
plan, `cuda_autocast_policy` registers CUDA's fp32 rules for those operators on the CPU autocast key for the duration
of the step, so the simulated dtypes (and bytes) are those of a GPU run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from stereo.config.schema import LossConfig, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# CUDA autocast's float32 operators that CPU autocast leaves alone (torch's CUDA autocast policy, "ops that can
# autocast to float32"). fp32: floating inputs are cast to fp32. opt_dtype: the op runs with dtype=float32 unless the
# caller chose a dtype (the output is fp32, the input is not copied).
CUDA_FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
             "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
             "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "cosine_similarity",
             "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
             "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
             "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits",
             "dist", "pdist", "cdist", "renorm", "logsumexp")
CUDA_FP32_OPT_DTYPE = ("prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
                       "linalg_vector_norm", "linalg_matrix_norm", "sum", "sum.dim_IntList")


# The CPU's attention kernels count as the GPU's flash attention that a CUDA run dispatches (same arguments first).
aten = torch.ops.aten
CPU_STANDS_FOR = {aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_flash_attention,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward:
                      aten._scaled_dot_product_flash_attention_backward}


@dataclass
class StepProfile:
    """What one simulated step costs. Bytes exclude the weights and optimizer states that exist before it."""

    flops: int
    operators: int  # non-view operators dispatched (about one GPU kernel launch each in eager mode)
    kept_bytes: int  # live after forward and loss: what backward needs (saved tensors, checkpoint inputs)
    peak_bytes: int  # highest live bytes during the step, gradients of the weights excluded


class LiveBytes(TorchDispatchMode):
    """A simulated allocator: each storage an operator creates is live from its creation until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.timeline: list[tuple[int, int]] = []  # (storage key, +1 created / -1 freed)
        self._keys: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []
        self.forward_end = 0  # timeline position when the loss is computed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        return out

    def existing(self, tensors) -> None:
        """Storages that exist before the step (weights, buffers): a view of one (`w.t()` in a linear layer) is not
        new memory."""
        for t in tensors:
            self._keys[t.untyped_storage()] = None

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._keys:
            return
        key = len(self.sizes)
        self._keys[storage] = key
        self.sizes.append(storage.nbytes())
        self.timeline.append((key, 1))
        self._refs.append(weakref.ref(storage, lambda _, key=key: self.timeline.append((key, -1))))

    def key_of(self, t: torch.Tensor) -> int | None:
        return self._keys.get(t.untyped_storage())

    def mark_forward_end(self) -> None:
        self.forward_end = len(self.timeline)

    def live_and_peak(self, exclude: set[int], until: int | None = None) -> tuple[int, int]:
        """(live bytes at event `until` (default: the end), the highest live bytes up to it), leaving out `exclude`."""
        live = peak = 0
        for key, sign in self.timeline[:until]:
            if key not in exclude:
                live += sign * self.sizes[key]
                peak = max(peak, live)
        return live, peak


class WorkCounter(TorchDispatchMode):
    """FLOPs (torch's flop formulas: convolutions, matmuls, attention; elementwise work is not counted, as usual for
    MFU) and the operators that compute something: views change metadata only and launch nothing, and `prim` queries
    (a fake tensor's device) are not operators. Unlike FlopCounterMode it hooks no modules, which would keep
    checkpointed activations alive and distort the memory measured alongside."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.operators += not func.is_view and func.namespace != "prim"
        formula = flop_registry.get(CPU_STANDS_FOR.get(func.overloadpacket, func.overloadpacket))
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def _eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _fp32_kernel(op):
    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            args, kwargs = pytree.tree_map(lambda x: x.float() if _eligible(x) else x, (args, kwargs))
            return op(*args, **kwargs)
    return kernel


def _opt_dtype_kernel(op):
    position = [a.name for a in op._schema.arguments].index("dtype")

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            given = args[position] if len(args) > position else kwargs.get("dtype")
            if given is None and _eligible(args[0]):
                if len(args) > position:
                    args = (*args[:position], torch.float32, *args[position + 1:])
                else:
                    kwargs = {**kwargs, "dtype": torch.float32}
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """CPU autocast follows CUDA's fp32 rules while inside (operators that CPU autocast already handles keep theirs:
    all of them are fp32 there too)."""
    library = torch.library.Library("aten", "IMPL")
    try:
        for names, make in ((CUDA_FP32, _fp32_kernel), (CUDA_FP32_OPT_DTYPE, _opt_dtype_kernel)):
            for name in names:
                packet, _, overload = name.partition(".")
                op = getattr(getattr(torch.ops.aten, packet), overload or "default")
                if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCPU"):
                    library.impl(name, make(op), "AutocastCPU")
        yield
    finally:
        library._destroy()


def _fake_model(cfg: ModelConfig, mode: FakeTensorMode, dtype: torch.dtype) -> torch.nn.Module:
    """The model built on the meta device (no memory, no init compute), then given fake CPU storages."""
    from stereo.model import build_model

    with torch.device("meta"):  # the layout changes no byte, and the model refuses channels-last off a GPU
        model = build_model(dataclasses.replace(cfg, channels_last=False))
    model.to(dtype)  # as DeepSpeed's bf16/fp16 modes cast the whole module
    cpu = torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            return t
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu) if t.is_meta else mode.from_tensor(t)

    model._apply(fake)
    for module in model.modules():  # plain tensor attributes (e.g. the disparity transformer's position table)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(module, name, fake(value))
    return model


def _tensors_of(model: torch.nn.Module) -> list[torch.Tensor]:
    plain = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return [*model.parameters(), *model.buffers(), *plain]


def simulate_step(cfg: ModelConfig, batch: int, height: int, width: int, iters: int, precision: str = "fp32",
                  train: bool = True, gpu: bool = False, amp: bool = False) -> StepProfile:
    """Forward + paper loss + backward (`train`), or a test-mode forward, at this size and precision ('fp32', 'bf16',
    'fp16'); `gpu`: with CUDA's autocast rules. The weights are cast to `precision` as DeepSpeed casts them, or with
    `amp` stay fp32 while the forward runs under autocast (torch AMP, as `bench` runs the model). The model's activation
    checkpointing switches apply as configured."""
    from stereo.train.loss import stereo_loss

    mode = FakeTensorMode()
    model = _fake_model(cfg, mode, torch.float32 if amp else DTYPES[precision])
    model.train(train)
    lower = amp and precision != "fp32"
    forward_precision = torch.autocast("cpu", dtype=DTYPES[precision]) if lower else contextlib.nullcontext()
    memory, work = LiveBytes(), WorkCounter()
    memory.existing(_tensors_of(model))
    policy = cuda_autocast_policy() if gpu and precision != "fp32" else contextlib.nullcontext()
    with policy, mode, work, memory:
        left = torch.empty(batch, 3, height, width)
        right = torch.empty(batch, 3, height, width)
        if train:
            gt = torch.empty(batch, 1, height, width)
            valid = torch.empty(batch, 1, height, width, dtype=torch.bool)
            with forward_precision:
                init_disp, preds = model(left, right, iters=iters)
            loss = stereo_loss(init_disp, preds, gt, valid, cfg.max_disp, LossConfig())["total"]
            del init_disp, preds
            memory.mark_forward_end()
            loss.backward()
            del loss
        else:
            with torch.no_grad(), forward_precision:
                model(left, right, iters=iters, test_mode=True)
            memory.mark_forward_end()
    grads = {memory.key_of(p.grad) for p in model.parameters() if p.grad is not None} - {None}
    kept, _ = memory.live_and_peak(grads, until=memory.forward_end)
    _, peak = memory.live_and_peak(grads)
    return StepProfile(flops=work.flops, operators=work.operators, kept_bytes=kept, peak_bytes=peak)
