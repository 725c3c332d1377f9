"""From the competition's files to batches: labels, images and their cache, the layout on disk,
folds, datasets, the data module, augmentation, the synthetic generator.
"""
