"""FoundationStereo training system: the library (model, data, losses, metrics) and the trainer on top."""

__version__ = "0.1.0"
