"""Benchmark: ``python -m svhn.bench`` measures each stage's speed (see ``svhn.analysis.bench``)."""

import sys

from svhn.analysis.bench import main

if __name__ == "__main__":
    sys.exit(main())
