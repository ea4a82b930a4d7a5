"""sdlora: train Stable Diffusion LoRA style adapters and mix weighted adapters at inference."""

__version__ = "0.1.0"
