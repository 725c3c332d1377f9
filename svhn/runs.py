"""Compare runs: ``python -m svhn.runs [runs/]`` (see ``svhn.analysis.runs``)."""

import sys

from svhn.analysis.runs import main

if __name__ == "__main__":
    sys.exit(main())
