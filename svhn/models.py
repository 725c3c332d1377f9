"""Renamed: the backbone registry is ``svhn.backbones`` (``python -m svhn.backbones``)."""

import sys

MESSAGE = ("svhn.models was renamed svhn.backbones: import from svhn.backbones, or run "
           "python -m svhn.backbones")

if __name__ == "__main__":
    sys.exit(MESSAGE)
raise ImportError(MESSAGE)
