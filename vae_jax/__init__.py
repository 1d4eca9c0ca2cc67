"""vae_jax: text VAEs without KL vanishing (Fu et al., NAACL 2019), in JAX/Flax."""
