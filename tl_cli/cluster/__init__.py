"""Running on several processes and clusters: collective helpers that work with or without a
process group (`distributed`) and SLURM batch scripts (`slurm`)."""
