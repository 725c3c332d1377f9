"""Predict: ``python -m svhn.predict CKPT [CKPT ...]`` writes a submission CSV
(see ``svhn.inference.cli``)."""

import sys

from svhn.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
