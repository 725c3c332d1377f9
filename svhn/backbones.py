"""List backbones: ``python -m svhn.backbones [--timm NAME ...]`` (see ``svhn.model.backbones``)."""

import sys

from svhn.model.backbones import main

if __name__ == "__main__":
    sys.exit(main())
