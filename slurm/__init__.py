"""SLURM through submitit: `mimscale launch` (one command as a multi-node job that requeues itself
on preemption), `mimscale sweep` (a sweep file as one job array) and `mimscale status`."""
