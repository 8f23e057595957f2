"""Memory and time planning of a training config on the CPU: `python -m stereo plan`, and the check that stops a run
(at `submit` and at `train` start on a GPU) whose planned peak does not fit the GPU."""

from stereo.plan.budget import Plan, check_fits, make_plan
from stereo.plan.gpus import GPUS, Gpu, local_gpu

__all__ = ["GPUS", "Gpu", "Plan", "check_fits", "local_gpu", "make_plan"]
