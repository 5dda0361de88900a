"""SLURM launching through submitit; filled in by later work."""
