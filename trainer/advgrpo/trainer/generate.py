"""``python -m advgrpo.trainer.generate`` = ``advgrpo-generate``."""

import sys

from advgrpo.trainer.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
