"""Write the style images `sdlora demo` trains on: samples/demo/{sepia,stripes}/NNN.png + .txt.

    python samples/make_demo_samples.py

Reproducible (seed 0): pictures the demo base draws for its own training prompts, kept when
they read back as their prompt, toned sepia or crossed by horizontal stripes; each caption is
the prompt. Run it again whenever the demo base changes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora.demo import SAMPLES_DIR, make_style_samples  # noqa: E402

if __name__ == "__main__":
    make_style_samples(SAMPLES_DIR)
    print(f"wrote {SAMPLES_DIR}")
