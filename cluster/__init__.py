"""SLURM tooling (import name ``hyperloop_dist.cluster``): profiles, the sbatch template, submission and
the memory / throughput planner. The YAML profiles and the template live beside this file."""
