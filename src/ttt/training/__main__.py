"""``python -m ttt.training CONFIG [key=value ...] [--resume [PATH]]``."""

import sys

from .trainer import _cli

if __name__ == "__main__":
    sys.exit(_cli())
