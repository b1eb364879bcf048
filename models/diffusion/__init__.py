"""The diffusion model itself: noise schedule, UNet, one optimisation step, samplers, guidance."""
