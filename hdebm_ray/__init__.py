"""hdebm_ray: distributed training of energy-based image generators (Hat Diffusion EBM and baselines) on Ray."""

__version__ = "0.1.0"
