"""Helpers the tests share: plain functions and constants, no fixtures and no tests.

``tests/`` is on ``sys.path`` when pytest runs (it inserts the folder of the rootdir
conftest.py), so a test imports them as ``from helpers.layout import write_split``.

- ``layout``: the one writer of the competition layout (image folders and label files).
- ``easy``: the easy set a small model learns in seconds (drawn digits, true boxes).
- ``runs``: running the commands (in this process or as ``python -m``), the tests' plain
  model, and reading what a run logged.
- ``checkpoints``: checkpoints of earlier formats, written from a seeded reader.
- ``drawing``: synthetic pictures for augmentation tests, and where their bright pixels are.
- ``logits``: logits that read given digits with a given confidence.
- ``repository``: the repository's files, for the guard that the tests write nothing there.
"""
