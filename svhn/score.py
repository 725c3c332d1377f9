"""Score: ``python -m svhn.score --submission SUBMISSION.csv --labels LABELS.json``
(see ``svhn.inference.scoring``)."""

import sys

from svhn.inference.scoring import main

if __name__ == "__main__":
    sys.exit(main())
