"""The augmentation presets applied to whole batches where the model runs.

With ``augment_on: device`` (``SVHNDataModule``) the dataloader only gathers cached uint8
images at cache size and the digits' boxes; :class:`BatchAugment` then augments the batch
on the model's device, after the host-to-device copy. It draws the same parameter ranges as
the albumentations presets in ``svhn.data.transforms`` (which stay the reference), per sample,
all at once for the batch from one seeded ``torch.Generator``:

- geometry: every step of a preset (the zoom preset's crop, the resize to ``image_size``,
  the random affine) is composed into one 3x3 matrix per sample, and each image is
  resampled once (bilinear, border replicated as ``cv2.BORDER_REPLICATE``). Boxes move
  with the same matrices: the four corners are mapped, their bounding box taken and
  clipped to the image (albumentations' "largest box").
- photometric: the colour jitter (brightness, contrast, saturation, hue, in a random order
  per sample) is one 3x3 colour matrix plus an offset per sample; blur (Gaussian or motion,
  per-sample kernels), noise, grey and inversion touch only the samples each one picks.

Two backends apply the same parameters (``backend="auto"`` picks by the batch's device):

- ``torch`` (accelerators): one ``F.affine_grid`` + ``F.grid_sample`` per batch, the
  jitter as one batched matrix product, blur as one grouped convolution.
- ``opencv`` (CPU tensors): ``cv2.warpAffine`` and ``cv2.transform`` image by image on
  uint8. On a CPU, torch's ``grid_sample`` and float passes over the batch cost 2-3x what
  OpenCV's small-image kernels do, and many-threaded batch ops stall when other processes
  share the cores; a Python loop over 64 images costs little next to either.

Output: uint8 (B, 3, H, W) images, as the CPU path sends them, so the reader's
``normalize`` and everything reading ``batch["image"]`` see one contract; and float
(B, 4) boxes, normalised (x0, y0, x1, y1).

Where it differs from albumentations (same ranges and probabilities, not the same pixels):
the ``torch`` backend clips the jitter to [0, 255] once at its end rather than after each
of its four steps; hue turns the colour around the grey axis (a YIQ rotation) rather than
shifting an HSV hue; motion blur is a centred line kernel (no random shift or direction
bias); crop edges and shifts are continuous rather than whole pixels. The tests compare the
two on the statistics that matter (crop sizes, box positions, brightness and colour).

Plain torch (and OpenCV, already a dependency), not kornia: kornia's augmentation
containers resample once per geometric step (a crop, then an affine) and would add a
dependency for what is here one matrix product per sample and one resampling per batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from svhn.data.transforms import (
    AFFINE,
    PRESETS,
    ZOOM_CROP_JITTER,
    ZOOM_CROP_MARGIN,
    ZOOM_CROP_P,
    ZOOM_NEAR_P,
    ZOOM_PRESETS,
    AffineRange,
    ColourRange,
    colour_range,
)
from svhn.errors import SettingError
from svhn.geometry import grow_box, union_boxes

__all__ = ["affine_grid", "BACKENDS", "BatchAugment", "derive_seed", "Photometric"]

_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # cv2's RGB -> grey, as albumentations uses
# albumentations' RandomCropNearBBox turns a single max_part_shift m into the range (0, m),
# read as (height, width): tight zoom crops are jittered in x only. Kept as the reference is.
ZOOM_JITTER_X, ZOOM_JITTER_Y = ZOOM_CROP_JITTER, 0.0
_BLUR_SIZE = 5  # kernels are 3 or 5 pixels wide (blur_limit (3, 5)), held in 5x5
_GAUSSIAN_SIGMA = (0.5, 3.0)  # albumentations' GaussianBlur default sigma_limit
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]], dtype=torch.float64)
BACKENDS = ("auto", "torch", "opencv")


# Small matrices are multiplied as batches (bmm), never broadcast into one mm: a BLAS mm
# wakes its thread pool, which on a CPU shared with other processes stalls ~10 ms a call.


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (global seed, rank, epoch): neighbours differ."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) % 2**63


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, *size), align_corners=False)`` built as one broadcast
    sum of a per-column and a per-row term (faster on CPU than its batched product)."""
    height, width = size
    device = theta.device
    u = (torch.arange(width, device=device, dtype=theta.dtype) * 2 + 1) / width - 1
    v = (torch.arange(height, device=device, dtype=theta.dtype) * 2 + 1) / height - 1
    columns = u[None, :, None] * theta[:, None, :, 0]  # (B, W, 2)
    rows = v[None, :, None] * theta[:, None, :, 1] + theta[:, None, :, 2]  # (B, H, 2)
    return rows[:, :, None, :] + columns[:, None, :, :]


def _invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """Inverses of (B, 3, 3) affine matrices (last row 0 0 1), in closed form: no solver
    call (``torch.linalg.inv`` would wait for the GPU to check for singular input)."""
    a, b, c, d = (matrices[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    det = a * d - b * c
    linear = torch.stack([torch.stack([d, -b], 1), torch.stack([-c, a], 1)], 1) / det[:, None,
                                                                                       None]
    out = torch.zeros_like(matrices)
    out[:, :2, :2] = linear
    out[:, :2, 2] = -(linear @ matrices[:, :2, 2:])[:, :, 0]
    out[:, 2, 2] = 1
    return out


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread for a stretch of small ops (restored after). The OpenCV
    backend's torch work is a few hundred ops on (B, <=5, <=5) tensors: one thread is never
    slower for them, while a second one, after the model's parallel ops, spin-waits and on a
    CPU shared with other processes made the whole batch several times slower."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in the layout the batch has: a channels-last batch (how gathered
    HWC images arrive) converts as contiguous HWC, many times faster than strided on CPU."""
    if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return images.permute(0, 2, 3, 1).float().permute(0, 3, 1, 2)
    return images.float()


@dataclass
class Photometric:
    """The random photometric choices for one batch, as (B, ...) tensors and per-sample
    masks (no data-dependent shapes: nothing waits for an accelerator). Both backends
    apply the same choices; the noise itself is drawn last, by the backend."""

    jitter: torch.Tensor  # (B,) jittered, with...
    matrix: torch.Tensor  # (B, 3, 3) rgb' = matrix @ rgb + offset (identity if not)
    offset: torch.Tensor  # (B, 3)
    blur: torch.Tensor  # (B,) blurred, with...
    kernels: torch.Tensor  # (B, 5, 5) kernels
    noise: torch.Tensor  # (B,) with noise of...
    noise_std: torch.Tensor  # (B,) standard deviation, in levels of 255
    grey: torch.Tensor  # (B,) turned grey
    invert: torch.Tensor  # (B,) inverted


class BatchAugment:
    """A preset of ``svhn.data.transforms`` for whole batches on their device.

    ``augment(images, boxes)``: ``images`` uint8 (B, 3, Hc, Wc) at cache size on any device,
    ``boxes`` (B, 4) normalised union boxes of the digits, or (B, K, 4) with the union box
    first and K - 1 more boxes (each digit's) that move along; returns uint8 (B, 3, H, W) at
    ``image_size`` and the boxes moved with the images. Random parameters come from one
    ``torch.Generator`` per device, seeded by ``seed`` (``reseed`` starts it again), so a
    seed gives the same batches on the same device. ``backend``: see the module docstring.
    """

    def __init__(self, preset: str, image_size: tuple[int, int], seed: int = 0,
                 backend: str = "auto"):
        if preset not in PRESETS:
            raise SettingError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}.")
        if backend not in BACKENDS:
            raise SettingError(f"unknown backend {backend!r}; choose one of {BACKENDS}.")
        self.preset = preset
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.backend = backend
        self.affine: AffineRange | None = AFFINE.get(preset)
        self.colour: ColourRange | None = colour_range(preset)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._constants: dict[torch.device, dict[str, torch.Tensor]] = {}

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Small constant tensors, copied to each device once (a copy from the host would
        otherwise wait for the accelerator on every batch)."""
        device = torch.device(device)
        if device not in self._constants:
            grey = torch.tensor(_GREY_WEIGHTS, dtype=torch.float32)
            self._constants[device] = {
                "grey": grey.to(device),
                "grey_rows": grey.expand(3, 3).contiguous().to(device),
                "yiq": _RGB_TO_YIQ.float().to(device),
                "yiq_inverse": torch.linalg.inv(_RGB_TO_YIQ).float().to(device),
            }
        return self._constants[device]

    def _uniform(self, low: float, high: float, shape: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator(device), device=device)
        return low + (high - low) * u

    def _chance(self, p: float, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator(device), device=device) < p

    def use_opencv(self, images: torch.Tensor) -> bool:
        return self.backend == "opencv" or (self.backend == "auto"
                                            and images.device.type == "cpu")

    # -- geometry -------------------------------------------------------------------------
    def crop_regions(self, boxes: torch.Tensor) -> torch.Tensor:
        """The region of each source image the output shows, normalised (x0, y0, x1, y1):
        the whole image, or for ``zoom`` a jittered crop around the digits or a random
        crop that keeps them."""
        n, device = len(boxes), boxes.device
        whole = torch.zeros(n, 4, device=device)
        whole[:, 2:] = 1
        if self.preset not in ZOOM_PRESETS:
            return whole
        # Tight: the box grown by the margin, each edge moved by up to the jitter share.
        grown = grow_box(boxes, ZOOM_CROP_MARGIN)
        reach = (grown[:, 2:] - grown[:, :2]).repeat(1, 2)
        reach[:, 0::2] *= ZOOM_JITTER_X
        reach[:, 1::2] *= ZOOM_JITTER_Y
        tight = grown + self._uniform(-1, 1, (n, 4), device) * reach
        # Box-safe: each edge anywhere between the box and the image's edge.
        u = torch.rand(n, 4, generator=self.generator(device), device=device)
        safe = torch.cat([boxes[:, :2] * u[:, :2], boxes[:, 2:] + (1 - boxes[:, 2:]) * u[:, 2:]],
                         1)
        crop = self._chance(ZOOM_CROP_P, n, device)[:, None]
        near = self._chance(ZOOM_NEAR_P, n, device)[:, None]
        regions = torch.where(crop, torch.where(near, tight, safe), whole).clamp(0, 1)
        # A crop is at least 1 % of the image each way (albumentations falls back likewise).
        low = regions[:, :2].clamp(max=0.99)
        high = torch.maximum(regions[:, 2:], low + 0.01)
        return torch.cat([low, high], 1)

    def affine_matrices(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, 3, 3) random affines in output pixels (x right, y down), about the image
        centre, composed as albumentations' Affine does: shift @ shear @ rotate @ scale."""
        eye = torch.eye(3, device=device).expand(n, 3, 3)
        r = self.affine
        if r is None:
            return eye.clone()
        height, width = self.image_size
        scale = self._uniform(*r.scale, (n, 2), device)
        shift = self._uniform(-r.shift, r.shift, (n, 2), device)
        angle = torch.deg2rad(self._uniform(-r.rotate, r.rotate, (n,), device))
        shear = torch.tan(torch.deg2rad(self._uniform(-r.shear, r.shear, (n, 2), device)))
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotate = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
        ones = torch.ones(n, device=device)
        shear_m = torch.stack([torch.stack([ones, shear[:, 0]], 1),
                               torch.stack([shear[:, 1], ones], 1)], 1)
        linear = shear_m @ rotate @ torch.diag_embed(scale)
        out = torch.zeros(n, 3, 3, device=device)
        out[:, :2, :2] = linear
        out[:, 2, 2] = 1
        # About the centre (cx, cy), then shifted by a share of the image size.
        cx, cy = width / 2, height / 2
        out[:, 0, 2] = cx + shift[:, 0] * width - (linear[:, 0, 0] * cx + linear[:, 0, 1] * cy)
        out[:, 1, 2] = cy + shift[:, 1] * height - (linear[:, 1, 0] * cx + linear[:, 1, 1] * cy)
        applied = self._chance(r.p, n, device)[:, None, None]
        return torch.where(applied, out, eye)

    def geometry(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) maps from normalised source coordinates (0..1, x then y) to normalised
        output coordinates: crop, resize, then the affine in output pixels."""
        n, device = len(boxes), boxes.device
        regions = self.crop_regions(boxes)
        extent = regions[:, 2:] - regions[:, :2]
        height, width = self.image_size
        # Crop + resize, straight into output pixels: x_out = (x - x0) / extent * width.
        crop = torch.zeros(n, 3, 3, device=device)
        crop[:, 0, 0], crop[:, 1, 1] = width / extent[:, 0], height / extent[:, 1]
        crop[:, 0, 2] = -regions[:, 0] / extent[:, 0] * width
        crop[:, 1, 2] = -regions[:, 1] / extent[:, 1] * height
        crop[:, 2, 2] = 1
        forward = self.affine_matrices(n, device) @ crop
        forward[:, 0] /= width  # output pixels -> normalised output coordinates
        forward[:, 1] /= height
        return forward

    @staticmethod
    def move_boxes(boxes: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
        """Boxes through ``forward`` maps: the bounding box of the four moved corners,
        clipped to the image; a box that leaves the image becomes the whole image (as the
        CPU path does when albumentations drops it). An empty box (all zeros: a blank
        position's digit box) stays empty."""
        if boxes.ndim == 3:  # (B, K, 4): every box of an image through its image's map
            count = boxes.shape[1]
            moved = BatchAugment.move_boxes(boxes.reshape(-1, 4),
                                            forward.repeat_interleave(count, dim=0))
            return moved.reshape(boxes.shape)
        x0, y0, x1, y1 = boxes.float().unbind(1)
        corners = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
                               torch.stack([x0, y1], 1), torch.stack([x1, y1], 1)], 1)
        moved = corners @ forward[:, :2, :2].transpose(1, 2) + forward[:, None, :2, 2]
        out = torch.cat([moved.amin(1), moved.amax(1)], 1).clamp(0, 1)
        empty = ((out[:, 2] - out[:, 0]) <= 0) | ((out[:, 3] - out[:, 1]) <= 0)
        whole = torch.zeros_like(out)
        whole[:, 2:] = 1
        out = torch.where(empty[:, None], whole, out)
        return torch.where((x1 > x0)[:, None], out, torch.zeros_like(out))

    def warp(self, images: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
        """Resample float images once through the inverse of each ``forward`` map."""
        # Grid coordinates are g = 2u - 1 on both sides: for u_src = A u_out + t,
        # g_src = A g_out + (A @ 1 + 2t - 1).
        inverse = _invert_affine(forward)
        linear, shift = inverse[:, :2, :2], inverse[:, :2, 2]
        theta = torch.cat([linear, (linear.sum(2) + 2 * shift - 1)[:, :, None]], 2)
        grid = affine_grid(theta, self.image_size)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def _warp_each(self, images: torch.Tensor, forward: torch.Tensor) -> np.ndarray:
        """The warp with OpenCV, image by image: uint8 (B, H, W, 3) at ``image_size``."""
        height, width = self.image_size
        source_h, source_w = images.shape[-2:]
        # cv2 maps pixel centres: unit u = (x + 0.5) / size on both sides.
        from_pixels = torch.tensor([[1 / source_w, 0, 0.5 / source_w],
                                    [0, 1 / source_h, 0.5 / source_h], [0, 0, 1]])
        to_pixels = torch.tensor([[width, 0, -0.5], [0, height, -0.5], [0, 0, 1.0]])
        n = len(forward)
        matrices = torch.bmm(torch.bmm(to_pixels.expand(n, 3, 3), forward.cpu()),
                             from_pixels.expand(n, 3, 3))[:, :2].double().numpy()
        source = images.cpu().permute(0, 2, 3, 1).numpy()
        out = np.empty((len(images), height, width, images.shape[1]), dtype=np.uint8)
        for i in range(len(images)):
            cv2.warpAffine(np.ascontiguousarray(source[i]), matrices[i], (width, height),
                           dst=out[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return out

    # -- photometric ----------------------------------------------------------------------
    def colour_matrices(self, mean_rgb: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample colour jitter as ``M @ rgb + offset``: brightness, contrast,
        saturation and hue composed in a random order per sample, as ColorJitter shuffles
        them. Contrast blends with the grey mean of the image as the earlier steps left it
        (``mean_rgb``: each image's channel means before the jitter). Also returns which
        samples are jittered (the others get the identity)."""
        c, n, device = self.colour, len(mean_rgb), mean_rgb.device
        constants = self.constants(device)
        grey = constants["grey"]
        eye = torch.eye(3, device=device).expand(n, 3, 3)
        matrix, offset = eye.clone(), torch.zeros(n, 3, device=device)
        bright = self._uniform(1 - c.brightness, 1 + c.brightness, (n,), device)
        contrast = self._uniform(1 - c.contrast, 1 + c.contrast, (n,), device)
        saturation = self._uniform(1 - c.saturation, 1 + c.saturation, (n,), device)
        hue = self._uniform(-c.hue, c.hue, (n,), device) * (2 * math.pi)
        order = torch.rand(n, 4, generator=self.generator(device), device=device).argsort(1)
        cos, sin = torch.cos(hue), torch.sin(hue)
        turn = torch.zeros(n, 3, 3, device=device)
        turn[:, 0, 0] = 1
        turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = cos, -sin, sin, cos
        hue_m = torch.bmm(torch.bmm(constants["yiq_inverse"].expand(n, 3, 3), turn),
                          constants["yiq"].expand(n, 3, 3))
        s = saturation[:, None, None]
        sat_m = s * eye + (1 - s) * constants["grey_rows"]
        rows = torch.arange(n, device=device)
        for step in range(4):
            mean_grey = (((matrix @ mean_rgb[:, :, None])[:, :, 0] + offset) * grey).sum(1)
            steps = (  # (matrix, offset) after each possible next step
                (bright[:, None, None] * matrix, bright[:, None] * offset),
                (contrast[:, None, None] * matrix,
                 contrast[:, None] * offset + ((1 - contrast) * mean_grey)[:, None]),
                (sat_m @ matrix, (sat_m @ offset[:, :, None])[:, :, 0]),
                (hue_m @ matrix, (hue_m @ offset[:, :, None])[:, :, 0]),
            )
            which = order[:, step]
            matrix = torch.stack([m for m, _ in steps], 1)[rows, which]
            offset = torch.stack([o for _, o in steps], 1)[rows, which]
        applied = self._chance(c.jitter_p, n, device)
        matrix = torch.where(applied[:, None, None], matrix, eye)
        offset = torch.where(applied[:, None], offset, torch.zeros_like(offset))
        return applied, matrix, offset

    def blur_kernels(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, 5, 5) kernels: half Gaussian (3 or 5 wide, sigma 0.5-3), half motion (a
        line 3 or 5 long at a random angle), each summing to 1."""
        half = _BLUR_SIZE // 2
        ax = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
        reach = torch.where(self._chance(0.5, n, device), 1.0, 2.0)  # kernel size 3 or 5
        inside = (ax.abs()[None] <= reach[:, None]).float()  # (n, 5)
        sigma = self._uniform(*_GAUSSIAN_SIGMA, (n,), device)
        g = torch.exp(-(ax[None] ** 2) / (2 * sigma[:, None] ** 2)) * inside
        gaussian = g[:, :, None] * g[:, None, :]
        angle = self._uniform(0, math.pi, (n,), device)[:, None, None]
        y, x = torch.meshgrid(ax, ax, indexing="ij")
        along = x * torch.cos(angle) + y * torch.sin(angle)
        across = -x * torch.sin(angle) + y * torch.cos(angle)
        beyond = (along.abs() - reach[:, None, None]).clamp(min=0)
        motion = (1 - torch.sqrt(across**2 + beyond**2)).clamp(min=0)
        kernels = torch.where(self._chance(0.5, n, device)[:, None, None], gaussian, motion)
        return kernels / kernels.sum(dim=(1, 2), keepdim=True)

    def sample_photometric(self, mean_rgb: torch.Tensor) -> Photometric | None:
        """Every random choice of the photometric steps but the noise itself, for a batch
        whose images have channel means ``mean_rgb``; None for ``none``."""
        c, n, device = self.colour, len(mean_rgb), mean_rgb.device
        if c is None:
            return None
        jitter, matrix, offset = self.colour_matrices(mean_rgb)
        blur = self._chance(c.blur_p, n, device)
        kernels = self.blur_kernels(n, device)
        noise = self._chance(c.noise_p, n, device)
        noise_std = self._uniform(*c.noise_std, (n,), device) * 255
        grey = self._chance(c.gray_p, n, device)
        invert = self._chance(c.invert_p, n, device)
        return Photometric(jitter, matrix, offset, blur, kernels, noise, noise_std, grey, invert)

    def colour_batch(self, images: torch.Tensor, p: Photometric) -> torch.Tensor:
        """The photometric steps on float images in [0, 255], batched: the jitter as one
        batched matrix product; blur, noise, grey and inversion computed for the whole
        batch and kept where a sample's mask says (cheap on an accelerator, and no
        data-dependent shapes)."""
        c, n, shape = self.colour, len(images), images.shape
        images = torch.baddbmm(p.offset[:, :, None], p.matrix, images.reshape(n, 3, -1))
        images = images.clamp_(0, 255).reshape(shape)
        if c.blur_p:
            pad = _BLUR_SIZE // 2
            flat = F.pad(images.reshape(1, n * 3, *shape[2:]), (pad,) * 4,
                         mode="reflect")  # torch's reflect is cv2's BORDER_REFLECT_101
            kernels = p.kernels.repeat_interleave(3, 0)[:, None]
            blurred = F.conv2d(flat, kernels, groups=n * 3).reshape(shape)
            images = torch.where(p.blur[:, None, None, None], blurred, images)
        if c.noise_p:
            noise = torch.randn(shape, generator=self.generator(images.device),
                                device=images.device)
            scale = (p.noise_std * p.noise)[:, None, None, None]
            images = images.addcmul_(noise, scale).clamp_(0, 255)
        if c.gray_p:
            grey = (images * self.constants(images.device)["grey"].view(1, 3, 1, 1)).sum(
                1, keepdim=True)
            images = torch.where(p.grey[:, None, None, None], grey.expand(shape), images)
        if c.invert_p:
            images = torch.where(p.invert[:, None, None, None], 255 - images, images)
        return images

    def colour_each(self, images: np.ndarray, p: Photometric) -> None:
        """The same steps with OpenCV, image by image, in place on uint8 (B, H, W, 3)."""
        jitter = torch.cat([p.matrix, p.offset[:, :, None]], 2).numpy()
        for i in p.jitter.nonzero()[:, 0].tolist():
            cv2.transform(images[i], jitter[i], dst=images[i])
        kernels = p.kernels.numpy()
        for i in p.blur.nonzero()[:, 0].tolist():
            cv2.filter2D(images[i], -1, kernels[i], dst=images[i],
                         borderType=cv2.BORDER_REFLECT_101)
        chosen = p.noise.nonzero()[:, 0]
        if len(chosen):
            noise = torch.randn((len(chosen), *images.shape[1:]),
                                generator=self.generator(p.noise.device))
            noise *= p.noise_std[chosen][:, None, None, None]
            rows = chosen.numpy()
            images[rows] = np.clip(np.rint(images[rows] + noise.numpy()), 0, 255)
        grey = np.array([_GREY_WEIGHTS] * 3, dtype=np.float32)
        for i in p.grey.nonzero()[:, 0].tolist():
            cv2.transform(images[i], grey, dst=images[i])
        for i in p.invert.nonzero()[:, 0].tolist():
            cv2.bitwise_not(images[i], dst=images[i])

    # -- the whole preset -----------------------------------------------------------------
    def __call__(self, images: torch.Tensor, boxes: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise SettingError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            if self.use_opencv(images):
                with _one_torch_thread():
                    return self._augment_opencv(images, boxes)
            boxes = boxes.to(images.device, torch.float32)
            forward = self.geometry(union_boxes(boxes))
            out = self.warp(_to_float(images), forward)
            colour = self.sample_photometric(out.mean(dim=(2, 3)))
            if colour is not None:
                out = self.colour_batch(out, colour)
            return out.round_().clamp_(0, 255).to(torch.uint8), self.move_boxes(boxes, forward)

    def _augment_opencv(self, images: torch.Tensor, boxes: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters drawn on the CPU as the torch backend draws them, pixels by OpenCV."""
        boxes = boxes.to("cpu", torch.float32)
        forward = self.geometry(union_boxes(boxes))
        out = self._warp_each(images, forward)
        means = torch.tensor([cv2.mean(image)[:3] for image in out],
                             dtype=torch.float32).reshape(-1, 3)
        colour = self.sample_photometric(means)
        if colour is not None:
            self.colour_each(out, colour)
        moved = self.move_boxes(boxes, forward)
        out = torch.from_numpy(out).permute(0, 3, 1, 2)
        return out.to(images.device), moved.to(images.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(preset={self.preset!r}, image_size={self.image_size}, "
                f"seed={self.seed}, backend={self.backend!r})")
