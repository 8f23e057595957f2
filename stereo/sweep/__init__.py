"""Hyper-parameter sweeps (docs/sweeps.md): a sweep file -> validated trials (`spec`), the sweep directory's
bookkeeping (`book`), trials one after another on this machine (`local`), the ranking and plots (`compare`, for
`python -m stereo compare --sweep`). Slurm job arrays are submitted by `jobs/sweep.py`."""
