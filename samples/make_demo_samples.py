"""Write the style images `sdlora demo` trains on: samples/demo/{sepia,stripes}/NNN.png + .txt.

    python samples/make_demo_samples.py                 # draw the originals, style them
    python samples/make_demo_samples.py --restyle sepia # re-style the originals in plain/

Reproducible (seed 0): pictures the demo base draws for its own training prompts, kept when
they read back as their prompt, toned sepia or crossed by horizontal stripes; each caption is
the prompt. Run it again whenever the demo base changes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora.demo import SAMPLES_DIR, make_style_samples, restyle  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:2] == ["--restyle"]:
        restyle(SAMPLES_DIR, sys.argv[2:] or None)
    else:
        make_style_samples(SAMPLES_DIR)
    print(f"wrote {SAMPLES_DIR}")
