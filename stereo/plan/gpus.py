"""GPUs the planner knows: memory as torch reports it, and the dense bf16 peak the MFU and the time floor use."""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets). Matched against the device name in order.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A40", 150.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)

GIB = 2**30
# What the allocator's tensors cannot have: the CUDA context, NCCL's buffers, cuDNN/cuBLAS workspaces and the caching
# allocator's fragmentation. A plan fits when its peak is at most `usable_bytes`.
RESERVED_FRACTION = 0.05
RESERVED_BYTES = 1 * GIB


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


@dataclass(frozen=True)
class Gpu:
    name: str  # what `plan --gpu` and `slurm.gpu` take
    device_name: str  # as torch.cuda.get_device_name reports it
    memory_bytes: int  # torch.cuda.get_device_properties(...).total_memory

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * (1 - RESERVED_FRACTION)) - RESERVED_BYTES

    @property
    def peak_tflops(self) -> float | None:
        return peak_bf16_tflops(self.device_name)


GPUS = {gpu.name: gpu for gpu in (
    Gpu("h100-80gb", "NVIDIA H100 80GB HBM3", int(79.11 * GIB)),
    Gpu("h200-141gb", "NVIDIA H200", int(139.8 * GIB)),
    Gpu("a100-80gb", "NVIDIA A100-SXM4-80GB", int(79.15 * GIB)),
    Gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", int(39.39 * GIB)),
    Gpu("rtx4090-24gb", "NVIDIA GeForce RTX 4090", int(23.65 * GIB)),  # the 24 GB cards inference users have
    Gpu("rtx3090-24gb", "NVIDIA GeForce RTX 3090", int(23.69 * GIB)),
)}


def local_gpu(index: int) -> Gpu:
    """The GPU this process runs on, as the planner describes it."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return Gpu(props.name, props.name, props.total_memory)
