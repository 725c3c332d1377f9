"""Training runs: the LightningCLI behind python -m svhn.fit, resume rules, callbacks, the
logger, run folders and their summaries.
"""
