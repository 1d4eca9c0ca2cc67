"""The paper's code: schedules, objectives, densities, models, kernels, the forward pass and
the metrics. Imports nothing of vae_jax outside core/."""
