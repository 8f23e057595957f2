"""Seeding from (seed, rank) and the RNG states a checkpoint carries, so a resumed run draws the same numbers."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int) -> None:
    derived = seed * 1_000_003 + rank  # distinct per rank, reproducible per (seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_state(seed: int, rank: int, step: int) -> dict:
    """The RNG states `seed_everything` would give a rank that starts at `step` (a rank added by an elastic resume,
    which has no saved state); the current states are left as they were."""
    saved = rng_state()
    seed_everything(seed + step, rank)
    state = rng_state()
    set_rng_state(saved)
    return state


def seed_micro_batch(seed: int, origin: tuple[int, int]) -> None:
    """torch's generators for one micro-batch (dropout), from the seed and the micro-batch's place in the job's data
    order (stereo.data.loader: its first sample's lane and draw), not from the rank that happens to compute it."""
    torch.manual_seed(int(np.random.SeedSequence([seed, *origin]).generate_state(1)[0]))
