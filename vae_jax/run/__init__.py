"""Running: the training loop, steps, populations, guards, workdirs, checkpoints, writers,
several hosts, config checks and the command line."""
