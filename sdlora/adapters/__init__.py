"""Adapter files: read any common format into `Adapter`, write kohya or diffusers layouts."""
