"""Export: ``python -m svhn.export CKPT --out reader.onnx`` writes the reader as ONNX with a
sidecar JSON, checked against PyTorch (see ``svhn.inference.export``)."""

import sys

from svhn.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
