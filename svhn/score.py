"""Score: ``python -m svhn.score --submission SUBMISSION.csv --labels LABELS.json``
(see ``svhn.analysis.score``)."""

import sys

from svhn.analysis.score import main

if __name__ == "__main__":
    sys.exit(main())
