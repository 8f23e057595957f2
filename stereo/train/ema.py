"""Exponential moving average of the trainable weights; used for validation and export, saved in checkpoints.

Under ZeRO-3 a parameter is an empty placeholder and each rank holds one flat partition of it (`ds_tensor`): the EMA
averages those partitions, so it is sharded like the weights and costs no communication. Each rank saves its shard
in its own trainer state; `join_partitions` puts the shards of all ranks back together for export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _values(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns: the local ZeRO-3 partition, else the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.module = module
        # fp32 shadow even when the module trains in bf16/fp16: a 0.9999 decay vanishes in bf16 rounding
        self.shadow = {name: _values(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        current = [_values(self.params[n]).detach().float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the module (validation), restoring the live ones after.
        Collective under ZeRO-3: every rank enters it."""
        with torch.no_grad():
            live = {n: _values(p).detach().clone() for n, p in self.params.items()}
            self._write(self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                self._write(live)

    def _write(self, values: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            target = _values(p)
            target.copy_(values[n].to(target.dtype))
        if self.partitioned:
            self._regather()

    def _regather(self) -> None:
        """ZeRO-3 keeps parameters gathered between uses (the small "persistent" ones, and others it will reuse soon),
        and neither a forward nor `all_gather` fetches a gathered one again: release those whole copies (the
        partitions stay as written) and gather them anew. Collective."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in self.module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(gathered)  # has_been_updated=False: frees the whole copies, keeps ds_tensor
            gathered[0].all_gather(gathered)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "partitioned": self.partitioned,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model's trainable parameters: {sorted(missing)[:5]}")
        if state.get("partitioned", False) != self.partitioned:
            raise ValueError(f"the EMA was saved {'with' if not self.partitioned else 'without'} ZeRO-3's partitions: "
                             "resume on the same side of deepspeed.zero_stage=3")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


    def resplit(self, saved: list[dict]) -> dict:
        """A state for this rank's ZeRO-3 partitions from the EMA states of all ranks of another world size: each
        parameter's shards are joined and this rank's slice of the new partitioning is cut out (zero-padded, as
        ZeRO-3 pads the last partition)."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        shapes = {n: p.ds_shape for n, p in self.params.items()}
        whole = join_partitions([s["shadow"] for s in saved], shapes)
        shadow = {}
        for name, tensor in whole.items():
            size = self.shadow[name].numel()
            flat = torch.nn.functional.pad(tensor.reshape(-1), (0, max(0, size * (rank + 1) - tensor.numel())))
            shadow[name] = flat[rank * size:(rank + 1) * size].clone()
        return {"decay": saved[0]["decay"], "partitioned": True, "shadow": shadow}


def join_partitions(shards: list[dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Whole tensors from the ranks' ZeRO-3 EMA shards (rank order): each parameter is the concatenation of its flat
    partitions, cut to its size (ZeRO-3 pads the last partition)."""
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([shard[name].reshape(-1) for shard in shards])
        out[name] = flat[:shape.numel()].reshape(shape)
    return out
