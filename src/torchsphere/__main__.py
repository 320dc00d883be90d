"""``python -m torchsphere ...`` (and ``torchrun ... -m torchsphere train ...``): the command line of :mod:`.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
