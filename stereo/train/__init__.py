"""The training engine: DeepSpeed setup, the loop, loss, schedules, EMA, checkpoints, logging, signals, export.

`python -m stereo train CONFIG [a.b=value ...]` (launched by torchrun) runs `stereo.train.loop.train`.
"""
