"""The sdlora web UI: `python app.py [--base MODEL] [--adapters-dir DIR] [--host H] [--port P]`.

The same as `sdlora ui`; see `python app.py --help` for every flag.
"""

import sys

from sdlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
