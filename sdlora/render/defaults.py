"""Generation defaults shared by `sdlora render` and the web UI (light: no torch import)."""

DEFAULT_STEPS = 20  # A1111's default
DEFAULT_CFG = 7.0
DEFAULT_SCHEDULER = "euler_a"
MAX_CLIP_SKIP = 12
