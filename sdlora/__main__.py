import sys

from sdlora.cli import main

sys.exit(main())
