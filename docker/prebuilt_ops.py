"""Checks, at the end of the image's dependency step, that DeepSpeed holds every op named in DS_PREBUILD compiled for
DS_ACCELERATOR: an op missing here would be JIT-built in every job (or fail where the image has no compiler)."""

import os
import sys

from deepspeed.git_version_info import accelerator_name, installed_ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS

wanted = {f"DS_BUILD_{op}" for op in os.environ["DS_PREBUILD"].split()}
by_variable = {builder.BUILD_VAR: name for name, builder in ALL_OPS.items()}
missing = sorted(v for v in wanted if not installed_ops.get(by_variable.get(v, ""), False))
print(f"DeepSpeed ops prebuilt for {accelerator_name}: {sorted(k for k, v in installed_ops.items() if v)}")
if accelerator_name != os.environ["DS_ACCELERATOR"] or missing:
    sys.exit(f"expected DeepSpeed ops for {os.environ['DS_ACCELERATOR']}; not prebuilt: {missing or 'all (wrong accelerator)'}")
