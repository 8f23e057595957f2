"""Distributed rendezvous from the Slurm environment: one task per trainer process, the same command on 1 GPU or
many nodes. The first node of SLURM_JOB_NODELIST hosts the TCP store, on a port derived from the job id (a requeued
job keeps its id, so every restart agrees on the port without talking)."""

from __future__ import annotations

import re
from collections.abc import Mapping

PORT_BASE = 20000
PORT_SPAN = 20000


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,7],login2") -> ["gpu01", "gpu02", "gpu03", "gpu7", "login2"]."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", text):
        if group:
            hosts.extend(_expand_group(group))
    return hosts


def _expand_group(group: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", group)
    if match is None:
        return [group]
    head, tail = group[: match.start()], group[match.end():]
    out = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        width = len(low)
        for number in range(int(low), int(high or low) + 1):
            out.extend(head + str(number).zfill(width) + rest for rest in _expand_group(tail))
    return out


def master_port(job_id: str) -> int:
    """A port in [20000, 40000) from the job id; array jobs ("123_4") use both numbers."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return PORT_BASE + digits % PORT_SPAN


def trainer_env(slurm_env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed `env://` variables (what torchrun would set) for this Slurm task."""
    try:
        # An array task has its own SLURM_JOB_ID (kept across its requeues): tasks of one array running side by
        # side on a node need their own ports, so not the SLURM_ARRAY_JOB_ID they share.
        job_id = slurm_env["SLURM_JOB_ID"]
        rank, world = int(slurm_env["SLURM_PROCID"]), int(slurm_env["SLURM_NTASKS"])
    except KeyError as exc:
        raise RuntimeError(f"not inside a Slurm task: {exc.args[0]} is not set") from None
    nodes = int(slurm_env.get("SLURM_JOB_NUM_NODES", slurm_env.get("SLURM_NNODES", "1")))
    hosts = expand_hostlist(slurm_env.get("SLURM_JOB_NODELIST", "")) or ["127.0.0.1"]
    return {
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port(job_id)),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": slurm_env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(world // nodes),
        "NODE_RANK": slurm_env.get("SLURM_NODEID", "0"),
    }
