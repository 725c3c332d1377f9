"""Backbones: a registry mapping a name to a builder of ``(B, 3, H, W) -> (B, features)``.

Classic CNNs (adapted to small 3-channel images, any input size through adaptive pooling)
are registered here by name; every other name is looked up in timm and built as a feature
extractor with ``num_classes=0``. ``python -m svhn.backbones`` prints the table of all
classic backbones and a few timm ones with parameter counts and output shapes.

Each backbone also says how its input is normalised (``input_normalization``): timm models
through their own data config (ImageNet statistics for ResNets, 0.5/0.5 for many ViTs),
classic ones with the ImageNet statistics the project has always used.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import timm
import torch
from torch import nn

from svhn.data.images import DEFAULT_IMAGE_SIZE
from svhn.errors import MissingInputError, SettingError, command

__all__ = ["alexnet", "available_backbones", "BackboneBuilder", "CLASSIC_BACKBONES",
           "create_backbone", "describe_backbones", "FeatureBackbone", "googlenet",
           "IMAGENET_MEAN", "IMAGENET_STD", "Inception", "input_normalization", "lenet5",
           "main", "nin", "register_backbone", "simple_cnn", "TIMM_EXAMPLES",
           "TimmFeatureMaps", "vgg"]

BackboneBuilder = Callable[[], nn.Module]
CLASSIC_BACKBONES: dict[str, BackboneBuilder] = {}
TIMM_EXAMPLES = ("resnet18d", "resnet18", "resnet50", "densenet121", "resnext50_32x4d", "dpn68",
                 "seresnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where timm's pretrained weights come from: the Hugging Face hub, or the mirror named by
# HF_ENDPOINT (as huggingface_hub reads it). HF_HUB_OFFLINE: from the local cache only.
_HUB_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "on", "true", "yes")  # huggingface_hub's values for a true HF_HUB_OFFLINE
_OFFLINE_HELP = (
    "Offline ways: --model.pretrained_weights FILE (a local weights file for this model), "
    "HF_HUB_OFFLINE=1 with the weights already in the Hugging Face cache, or "
    "--model.pretrained false (train from scratch)."
)


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def add(builder: BackboneBuilder) -> BackboneBuilder:
        CLASSIC_BACKBONES[name] = builder
        return builder
    return add


class FeatureBackbone(nn.Module):
    """A convolutional body followed by pooling to a small grid, flattened.

    A (1, 1) grid is global pooling; a wider grid keeps where things are, which a box
    head needs and which the digit heads can use (the k-th digit sits left of the k+1-th).
    """

    def __init__(self, body: nn.Module, channels: int, pool: tuple[int, int] = (1, 1)):
        super().__init__()
        self.body = body
        self.channels = channels
        self.set_grid(pool)

    def set_grid(self, grid: tuple[int, int]) -> None:
        self.pool = nn.AdaptiveAvgPool2d(tuple(grid))
        self.num_features = self.channels * grid[0] * grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(images)), 1)


class TimmFeatureMaps(nn.Module):
    """A timm model's feature maps (B, C, h, w), before its own pooling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register_backbone("simple_cnn")
def simple_cnn() -> FeatureBackbone:
    """The competition tutorial's model: two 3x3 stride-2 convs (3->16->32), ReLU, max-pool.

    The tutorial flattens a 60x120 input to 32*3*7 features; adaptive pooling to 3x7 keeps
    that feature size at any input size.
    """
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
    )
    return FeatureBackbone(body, 32, pool=(3, 7))


@register_backbone("lenet5")
def lenet5() -> FeatureBackbone:
    body = nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(16, 120, 5, padding=2), nn.Sigmoid(),
    )
    return FeatureBackbone(body, 120, pool=(1, 2))


@register_backbone("alexnet")
def alexnet() -> FeatureBackbone:
    body = nn.Sequential(
        nn.Conv2d(3, 64, 5, stride=1, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(128, 192, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(192, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return FeatureBackbone(body, 128, pool=(2, 4))


@register_backbone("vgg")
def vgg() -> FeatureBackbone:
    """A small VGG: blocks of repeated 3x3 convs, channel counts doubling, max-pool after."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, repeats in ((32, 1), (64, 1), (128, 2), (256, 2)):
        for _ in range(repeats):
            layers.append(_conv_bn(c_in, c_out))
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    return FeatureBackbone(nn.Sequential(*layers), 256, pool=(1, 2))


def _nin_block(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 1), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 1), nn.ReLU(inplace=True),
    )


@register_backbone("nin")
def nin() -> FeatureBackbone:
    """Network in Network: conv blocks with 1x1 'micro networks', no dense body."""
    body = nn.Sequential(
        _nin_block(3, 64, 5, 1), nn.MaxPool2d(2),
        _nin_block(64, 128, 3, 1), nn.MaxPool2d(2),
        _nin_block(128, 192, 3, 1), nn.MaxPool2d(2), nn.Dropout(0.3),
        _nin_block(192, 256, 3, 1),
    )
    return FeatureBackbone(body, 256, pool=(1, 2))


class Inception(nn.Module):
    """GoogLeNet's block: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 paths, concatenated."""

    def __init__(self, c_in: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], cp: int):
        super().__init__()
        self.path1 = _conv_bn(c_in, c1, 1)
        self.path3 = nn.Sequential(_conv_bn(c_in, c3[0], 1), _conv_bn(c3[0], c3[1], 3))
        self.path5 = nn.Sequential(_conv_bn(c_in, c5[0], 1), _conv_bn(c5[0], c5[1], 5))
        self.pathp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(c_in, cp, 1))
        self.out_channels = c1 + c3[1] + c5[1] + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.path1(x), self.path3(x), self.path5(x), self.pathp(x)], 1)


@register_backbone("googlenet")
def googlenet() -> FeatureBackbone:
    stem = nn.Sequential(_conv_bn(3, 32, 3), nn.MaxPool2d(2), _conv_bn(32, 64, 3), nn.MaxPool2d(2))
    block_a = Inception(64, 32, (48, 64), (8, 16), 16)
    block_b = Inception(block_a.out_channels, 64, (64, 96), (16, 48), 32)
    block_c = Inception(block_b.out_channels, 96, (96, 128), (16, 32), 32)
    body = nn.Sequential(stem, block_a, block_b, nn.MaxPool2d(2), block_c)
    return FeatureBackbone(body, block_c.out_channels, pool=(1, 2))


def available_backbones() -> list[str]:
    """The classic names; any ``timm.list_models()`` name works as well."""
    return sorted(CLASSIC_BACKBONES)


def create_backbone(
    name: str, pretrained: bool = False, pretrained_weights: str | None = None,
    feature_grid: tuple[int, int] | None = None, timm_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a backbone by name; the result has ``num_features``.

    ``pretrained`` loads ImageNet weights through timm (needs network); ``pretrained_weights``
    loads a local weights file (a state dict saved with ``torch.save`` or safetensors) into a
    timm model: the offline way. Classic backbones have no pretrained weights.
    ``feature_grid`` pools the last feature maps to that (rows, columns) grid instead of the
    backbone's own pooling (timm CNNs and classic backbones). ``timm_args`` go to
    ``timm.create_model`` (e.g. ``drop_path_rate``, ``drop_rate``).
    """
    timm_args = dict(timm_args or {})
    if name in CLASSIC_BACKBONES:
        if pretrained or pretrained_weights:
            raise SettingError(f"backbone {name!r} has no pretrained weights; use a timm name.")
        if timm_args:
            raise SettingError(f"backbone {name!r} is not a timm model: drop timm_args "
                             f"{timm_args}.")
        backbone = CLASSIC_BACKBONES[name]()
        if feature_grid:
            backbone.set_grid(feature_grid)
        return backbone
    if not timm.is_model(name):
        raise SettingError(
            f"unknown backbone {name!r}: not one of {available_backbones()} nor a timm model "
            "name (see timm.list_models())."
        )
    if pretrained_weights:
        model = _timm_from_file(name, Path(pretrained_weights), timm_args)
    elif pretrained and _hub_offline():
        model = _timm_from_hub_cache(name, timm_args)
    else:
        if pretrained:
            _check_weights_reachable(name)
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_args)
    if not feature_grid:
        return model
    return FeatureBackbone(TimmFeatureMaps(model), model.num_features, tuple(feature_grid))


def input_normalization(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the images this backbone expects, on a 0-1 scale."""
    timm_model = backbone.body.model if isinstance(getattr(backbone, "body", None),
                                                   TimmFeatureMaps) else backbone
    if getattr(timm_model, "pretrained_cfg", None):
        config = timm.data.resolve_model_data_config(timm_model)
        return tuple(config["mean"]), tuple(config["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _weights_endpoint() -> tuple[str, str, int]:
    """(address, host, port) of the hub the weights come from: ``HF_ENDPOINT`` (a mirror)
    when set, else huggingface.co; the port is the address's own, else 443 for https and
    80 for http."""
    address = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or _HUB_ENDPOINT
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise SettingError(
            f"HF_ENDPOINT={address!r}: not a hub address. Set a URL such as "
            "https://hf-mirror.com or http://HOST:PORT, or unset it for huggingface.co.")
    return address, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _check_weights_reachable(name: str) -> None:
    """Fail in seconds, not after the hub's retries, when the weights cannot be fetched:
    one connection to the host (``HF_ENDPOINT``'s, else huggingface.co) and port."""
    address, host, port = _weights_endpoint()
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        source = f"{address} (HF_ENDPOINT)" if address != _HUB_ENDPOINT else address
        raise SettingError(
            f"backbone {name!r} with pretrained: true downloads its ImageNet weights from "
            f"{source}, but {host}:{port} cannot be reached ({err}). {_OFFLINE_HELP}"
        ) from None


def _timm_from_hub_cache(name: str, timm_args: dict[str, Any]) -> nn.Module:
    """``HF_HUB_OFFLINE``: no network attempt at all; the weights must already be in the
    Hugging Face cache, as huggingface_hub reads it."""
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **timm_args)
    except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not cached
        raise SettingError(
            f"backbone {name!r} with pretrained: true: HF_HUB_OFFLINE is set, so its "
            "ImageNet weights can only come from the local Hugging Face cache (HF_HOME, by "
            "default ~/.cache/huggingface), and they are not there. Point "
            "--model.pretrained_weights FILE at a local weights file for this model, unset "
            "HF_HUB_OFFLINE to download them once (HF_ENDPOINT names a mirror), or "
            "--model.pretrained false."
        ) from None


def _timm_from_file(name: str, weights: Path, timm_args: dict[str, Any]) -> nn.Module:
    """A timm model with a local weights file, loaded strictly by timm itself (a file made
    for another architecture fails instead of half-loading), classifier removed."""
    if not weights.is_file():
        raise MissingInputError(
            f"{weights}: pretrained weights file not found. Download the {name} ImageNet "
            "weights (e.g. timm's model page) and point pretrained_weights at the file."
        )
    try:
        # With its own classifier the model loads the file strictly (timm is lenient only
        # when num_classes differs), then the classifier is dropped.
        model = timm.create_model(name, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(weights)}, **timm_args)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise SettingError(
            f"{weights}: cannot load as weights for timm model {name!r} ({first_line}). "
            "Check that the file was made for this exact architecture."
        ) from None
    except Exception as err:  # torch and safetensors raise many kinds for unreadable files
        raise SettingError(f"{weights}: cannot read as a weights file ({err}).") from None
    model.reset_classifier(0)
    return model


def describe_backbones(names: list[str], image_size: tuple[int, int]) -> list[dict]:
    """Parameter counts and output shape of each backbone at ``image_size``."""
    rows = []
    for name in names:
        model = create_backbone(name).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *image_size))
        params = sum(p.numel() for p in model.parameters())
        rows.append({"backbone": name, "params": params, "output": tuple(out.shape)})
    return rows


@command
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m svhn.backbones",
                                     description="List the backbones with sizes and shapes.")
    parser.add_argument("--image_size", type=int, nargs=2, default=DEFAULT_IMAGE_SIZE,
                        metavar=("H", "W"))
    parser.add_argument("--timm", nargs="*", default=list(TIMM_EXAMPLES),
                        help="timm model names to include")
    args = parser.parse_args(argv)
    rows = describe_backbones(available_backbones() + list(args.timm), tuple(args.image_size))
    print(f"{'backbone':<18} {'params':>12}  output at {args.image_size[0]}x{args.image_size[1]}")
    for row in rows:
        print(f"{row['backbone']:<18} {row['params']:>12,}  {row['output']}")
