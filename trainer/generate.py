"""``python -m trainer.generate`` = ``advgrpo-generate``."""

import sys

from .cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
