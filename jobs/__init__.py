"""Slurm jobs through submitit: `submit` (config -> queued run), the checkpointable job, `status`/`logs`/`cancel`.

The library (`stereo.*`) never imports from here; the job only launches `python -m stereo train`.
"""
