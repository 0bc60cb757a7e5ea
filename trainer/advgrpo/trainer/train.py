"""``python -m advgrpo.trainer.train`` = ``advgrpo-train``."""

import sys

from advgrpo.trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
