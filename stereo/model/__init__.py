"""FoundationStereo: `build_model(cfg.model)`; see docs/architecture.md for the interface."""

from __future__ import annotations

from stereo.config.schema import ModelConfig
from stereo.model.foundation_stereo import FoundationStereo


def build_model(cfg: ModelConfig) -> FoundationStereo:
    model = FoundationStereo(cfg)
    if cfg.channels_last:
        model.use_channels_last()
    return model


__all__ = ["FoundationStereo", "build_model"]
