"""byol_jax: BYOL (Grill et al., 2020) on current JAX, Haiku and optax."""
