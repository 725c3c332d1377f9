"""Report: ``python -m svhn.report --ckpt_path CKPT --out FOLDER`` writes figures and a
markdown report (see ``svhn.analysis.report``)."""

import sys

from svhn.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
