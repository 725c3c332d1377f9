"""Train: ``python -m svhn.fit [--config configs/X.yaml ...]`` (see ``svhn.train.cli``)."""

import sys

from svhn.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
