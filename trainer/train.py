"""``python -m trainer.train`` = ``advgrpo-train``."""

import sys

from .cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
