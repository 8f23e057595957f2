"""Hyper-parameter sweeps: a sweep file -> validated trials (`spec`), the sweep directory's bookkeeping (`book`),
trials run one after another on this machine (`local`). Slurm job arrays are submitted by `jobs/sweep.py`; the
comparison is `stereo.eval.compare --sweep`."""
