"""Checkpoints written by the tests: the least one holds (``write_model_checkpoint``) and
those of an earlier format, written from a seeded reader.

Format 1 (svhn before the reader had its own module): weights at the top level of the
state dict, ``zoom: bool`` beside ``zoom_steps``, no recorded format or precision. The
checkpoints are written in exactly the layout that code saved (checked against files it
wrote), so no binary fixture lives in the repository.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svhn.model.reader import DigitReader

FORMAT_1_SETTINGS = {
    "legacy_plain": {"feature_grid": None, "box_head": False, "zoom": False, "zoom_steps": 1},
    "legacy_zoom": {"feature_grid": (2, 4), "box_head": True, "zoom": True, "zoom_steps": 2},
}


def write_model_checkpoint(path: Path, model: nn.Module) -> Path:
    """The least ``load_reader`` reads: a ``DigitSequenceModel``'s weights and
    hyperparameters, saved at ``path`` (no trainer state, no data settings)."""
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)},
               path)
    return path


def write_format_1_checkpoint(path: Path, name: str) -> DigitReader:
    """A format-1 checkpoint of a seeded simple_cnn reader at ``path``; returns the reader
    (today's code, the same weights) whose outputs the old checkpoint must reproduce."""
    old = FORMAT_1_SETTINGS[name]
    torch.manual_seed(0)
    reader = DigitReader(backbone="simple_cnn", image_size=(64, 128),
                         feature_grid=old["feature_grid"], box_head=old["box_head"],
                         zoom_steps=old["zoom_steps"] if old["zoom"] else 0).eval()
    zoom = name == "legacy_zoom"
    torch.save({
        "epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.6.6",
        "state_dict": reader.state_dict(),  # top-level names: no "reader." prefix
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "backbone": "simple_cnn", "pretrained": False, "pretrained_weights": None,
            "max_len": 5, "image_size": (64, 128), "hidden_dim": 0, "dropout": 0.0,
            "label_smoothing": 0.0, "box_loss_weight": 1.0, "zoom_margin": 0.15,
            "init_from": None, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
            "momentum": 0.9, "scheduler": "none", "step_epochs": 10,
            "channels_last": False, "compile": False, **old},
        "datamodule_hparams_name": "kwargs",
        "datamodule_hyper_parameters": {
            "data_dir": "legacy_data/mchar", "image_size": (64, 128), "batch_size": 16,
            "num_workers": 0, "max_len": 5, "augment": "zoom" if zoom else "baseline",
            "train_on": ("train",), "val_on": "val", "predict_on": "test_a",
            "cache_dir": None, "cache_scale": 2.0 if zoom else 1.0,
            "eval_scale": 2.0 if zoom else 1.0, "box_targets": zoom,
            "synthetic_fallback": False, "synthetic_size": 2000, "extra_train": (),
            "synthetic_extra": 0},
    }, path)
    return reader
