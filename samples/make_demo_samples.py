"""Write the style images `sdlora demo` trains on: samples/demo/{sepia,stripes}/NNN.png + .txt.

    python samples/make_demo_samples.py

Procedural and reproducible (seed 0): the base's kind of picture, one shape on a plain
background, toned sepia or crossed by horizontal stripes; each caption names the content.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora.demo import SAMPLES_DIR, make_style_samples  # noqa: E402

if __name__ == "__main__":
    make_style_samples(SAMPLES_DIR)
    print(f"wrote {SAMPLES_DIR}")
