"""Read any photo: ``python -m svhn.read CKPT [CKPT ...] IMAGE|FOLDER ...`` prints the number
on each (see ``svhn.inference.photo_cli``)."""

import sys

from svhn.inference.photo_cli import main

if __name__ == "__main__":
    sys.exit(main())
