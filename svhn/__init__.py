"""svhn: read house numbers from photos (the SVHN street-character competition).

Subpackages: data (files to batches), model (the reader and its training), train (the
CLI behind python -m svhn.fit), inference (checkpoints to submissions), analysis (scores,
figures, runs, benchmarks). docs/architecture.md has the floor plan.
"""
