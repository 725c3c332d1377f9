"""Synthetic data: ``python -m svhn.synthetic --out FOLDER`` writes house numbers in the
competition layout (see ``svhn.data.synthetic``)."""

import sys

from svhn.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
