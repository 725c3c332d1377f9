"""The reader and its training: backbones, the DigitReader, box geometry, the zoom search's
vote, metrics, the LightningModule.
"""
