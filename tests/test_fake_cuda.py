"""The GPU path, checked without a GPU: the reader, its training step, the zoom search, the
batch augmentation's torch backend and the prediction step run on a fake CUDA device.

``FakeTensorMode`` gives tensors shapes and devices but no data. The models are built on the
CPU and moved with ``.to("cuda")``, as Lightning moves them (a tensor kept outside the
module's parameters and buffers stays behind, as it would on a GPU); the batches are made
under ``torch.device("cuda")``; the calls run without it: a tensor the code creates without
naming the device lands on the CPU, as it would on a real GPU run, and mixing it with CUDA
tensors raises ``FakeTensorDeviceMismatchError``; a value the host must read back
(``.item()``, ``if tensor.any():``) raises ``DataDependentOutputException``: on a GPU each is
a wait for the device. What stays synchronous on purpose is in docs/performance.md.

The models are not built inside the fake mode: torchmetrics' metrics built there corrupted
this process's heap (docs/performance.md has the measurements).

Left out, and said here: the autograd engine needs a real CUDA context for ``backward()``
(the training step is checked up to its loss); a CUDA ``torch.Generator`` needs a real
device (the augmentation's generator is replaced by the default one for the test); and the
detector's step uses torchvision's GIoU loss, which syncs once per step (replaced by the
same formula without a mask for the test). Every other piece runs as it is.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
    unset_fake_temporarily,
)

from svhn.data.batch_augment import BatchAugment
from svhn.data.labels import BLANK, canonical_predictions
from svhn.inference.predictor import ReaderPredictor
from svhn.model import detector
from svhn.model.reader import HEADS, DigitReader
from svhn.model.training import DigitSequenceModel
from svhn.model.vote import answer_confidence

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                reason="this torch build has no CUDA to fake")

CUDA = torch.device("cuda", 0)
READER = {"backbone": "resnet10t", "image_size": (32, 64), "max_len": 3, "box_head": True,
          "char_boxes": True, "zoom_steps": 2, "zoom_from": "digits", "zoom_search": True,
          "feature_grid": (2, 4)}


@pytest.fixture
def fake_cuda(monkeypatch):
    # FakeTensorMode asks torch.cuda.is_available() on every operation; with Lightning
    # imported that probes NVML and the CUDA runtime each time. The answer is known: no
    # device here. (The heap fault once blamed on it came from building metrics inside the
    # fake mode: see _moved_to_cuda.)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Real CPU constants (module-level tensors) may enter: they become fake CPU tensors,
    # so using one on the device without moving it still fails.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _on_cuda(make):
    with torch.device("cuda"):
        return make()


def _moved_to_cuda(build):
    """A module built for real on the CPU, then moved onto the fake device as Lightning
    moves it: its parameters, buffers and metric states become fake CUDA tensors."""
    with unset_fake_temporarily():
        module: nn.Module = build()
    return module.to(CUDA)


def _batch(size: int = 4, height: int = 64, width: int = 128) -> dict[str, torch.Tensor]:
    return {"image": torch.empty(size, 3, height, width, dtype=torch.uint8),
            "target": torch.full((size, 3), BLANK, dtype=torch.long),
            "box": torch.empty(size, 4), "char_boxes": torch.empty(size, 3, 4)}


@pytest.mark.parametrize("head", HEADS)
def test_the_zoom_search_runs_on_the_device_without_waiting_for_it(fake_cuda, head):
    reader = _moved_to_cuda(lambda: DigitReader(**READER, head=head, search_gate=1.0).eval())
    images = _on_cuda(lambda: _batch()["image"])
    reads, read = [], reader.read
    reader.read = lambda crops: reads.append(len(crops)) or read(crops)
    with torch.no_grad():
        out = reader(images)
    assert out["chain_logits"].shape == (4, 29, 3, 11)
    assert all(value.device == CUDA for value in out.values())
    # On the device the 29 chains run side by side: one read per zoom step.
    assert reads == [4] + [4 * 29] * READER["zoom_steps"]


def test_a_pseudo_labelling_read_stays_on_the_device_until_its_answers(fake_cuda):
    # What a round of --data.unlabelled reads per batch: the full search and each answer's
    # confidence, computed where the reader runs (no host read before the copy back).
    reader = _moved_to_cuda(lambda: DigitReader(**READER, search_gate=1.0).eval())
    images = _on_cuda(lambda: _batch()["image"])
    with torch.no_grad():
        out = reader(images)
        probs = out["logits"].float().softmax(-1)
        confidence = answer_confidence(probs, out["chain_logits"].float().softmax(-1),
                                       out["chain_boxes"])
    assert confidence.shape == (4,) and confidence.device == CUDA
    assert out["char_boxes"].device == CUDA


def _giou_loss_without_masks(boxes, targets, reduction="none", eps=1e-7):
    """torchvision's generalized_box_iou_loss, its intersection taken by clamping instead of
    its masked assignment (which reports the mask's size back to the host)."""
    low = torch.maximum(boxes[..., :2], targets[..., :2])
    high = torch.minimum(boxes[..., 2:], targets[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = (boxes[..., 2:] - boxes[..., :2]).prod(-1) \
        + (targets[..., 2:] - targets[..., :2]).prod(-1) - inter
    enclosing = (torch.maximum(boxes[..., 2:], targets[..., 2:])
                 - torch.minimum(boxes[..., :2], targets[..., :2])).prod(-1)
    return 1 - inter / (union + eps) + (enclosing - union) / (enclosing + eps)


@pytest.mark.parametrize("head", HEADS)
def test_a_training_step_reaches_its_loss_on_the_device(fake_cuda, head, monkeypatch):
    # Patched for the detector: torchvision's GIoU loss syncs once per step (a boolean
    # mask); docs/performance.md lists it. The rest of the step runs as it is.
    monkeypatch.setattr(detector, "generalized_box_iou_loss", _giou_loss_without_masks)
    model = _moved_to_cuda(lambda: DigitSequenceModel(**READER, head=head))
    batch = _on_cuda(lambda: _batch(height=32, width=64))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer to log to
        loss = model.training_step(batch, 0)
    assert loss.device == CUDA and loss.requires_grad and loss.ndim == 0


def test_the_prediction_step_gathers_on_the_device(fake_cuda):
    reader = _moved_to_cuda(lambda: DigitReader(**READER, search_gate=1.0).eval())
    batch = _on_cuda(_batch)
    batch["file_name"] = [f"{i:06d}.png" for i in range(4)]
    with torch.no_grad():
        result = ReaderPredictor(reader, views=("identity", "zoom_in")
                                 ).predict_step(batch, 0)
    assert result["chain_probs"].shape == (4, 58, 3, 11)  # both views' chains, voted
    for key in ("probs", "box", "chain_probs", "chain_boxes", "searched"):
        assert result[key].device == CUDA, key


def test_the_batch_augmentation_runs_on_the_device(fake_cuda, monkeypatch):
    # The one patched piece: a CUDA torch.Generator cannot be faked.
    monkeypatch.setattr(BatchAugment, "generator", lambda self, device: None)
    augment = BatchAugment("zoom", (32, 64), seed=0)
    batch = _on_cuda(lambda: _batch(height=64, width=128))
    boxes = torch.cat([batch["box"][:, None], batch["char_boxes"]], dim=1)
    images, moved = augment(batch["image"], boxes)
    assert not augment.use_opencv(batch["image"])  # the torch backend ran
    assert images.shape == (4, 3, 32, 64) and images.device == CUDA
    assert moved.shape == (4, 4, 4) and moved.device == CUDA


def test_the_fake_device_catches_a_cpu_tensor_and_a_host_read(fake_cuda):
    """What the tests above rely on: the two faults they are there to catch do raise."""
    logits = _on_cuda(lambda: torch.empty(2, 3, 11))
    with pytest.raises(FakeTensorDeviceMismatchError):
        logits + torch.zeros(1, 3, 11)  # created without a device: on the CPU
    with pytest.raises(DataDependentOutputException):
        if logits.sum() > 0:  # the host reads a value back
            pass
    # canonical_predictions once asked "if empty.any():" on every vote; now it does not.
    assert canonical_predictions(logits.softmax(-1)).device == CUDA
