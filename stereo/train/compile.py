"""`train.compile`: the model's regions (stereo.model.foundation_stereo.REGIONS) and the loss, each compiled on its
own, with Inductor's caches in one directory shared by every start of every run.

Dynamo's tracing is redone at every start (it is not cached); Inductor's code generation (the FX graph cache) and
AOTAutograd's joint graphs (the autograd cache) are read back from the cache directory instead of being redone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from stereo.config import Config
from stereo.train.loss import stereo_loss


def enabled(cfg: Config, device: torch.device) -> bool:
    """auto: regions on a GPU; off on a CPU, where compiling costs more than it saves in a demo run."""
    return cfg.train.compile == "regions" or (cfg.train.compile == "auto" and device.type == "cuda")


def cache_dir(cfg: Config, run_path: Path) -> Path:
    """train.compile_cache, else compile-cache beside the run directory (runs/compile-cache for runs/<name>)."""
    return Path(cfg.train.compile_cache) if cfg.train.compile_cache else run_path.resolve().parent / "compile-cache"


def use_cache(directory: Path) -> None:
    """Inductor's code, AOTAutograd's graphs (and Triton's kernels, under Inductor's) cached in `directory`.
    Set before the first compilation; the writes are atomic, so ranks and jobs may share the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True


def compile_training(model: torch.nn.Module, cfg: Config, run_path: Path) -> Callable:
    """Compiles the model's regions in place and returns the loss function to call (the compiled loss)."""
    use_cache(cache_dir(cfg, run_path))
    model.compile_regions(backend=cfg.train.compile_backend)
    return torch.compile(stereo_loss, dynamic=False, backend=cfg.train.compile_backend)


def stats() -> dict[str, int]:
    """Dynamo's and the caches' counters in this process: graphs compiled, graph breaks, cache hits and misses. A
    recompilation shows as more graphs than after the first step."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fx_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hits": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_misses": counters["aot_autograd"]["autograd_cache_miss"],
    }
