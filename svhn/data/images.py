"""Reading images, and a decode-once cache of resized images in a memory-mapped array.

PNG decoding is the slowest part of the pipeline by far, so each image is decoded once,
resized to the cache size and kept as uint8 in ``<cache_dir>/<split>_<H>x<W>.npy``. A
manifest beside it records each file's name, byte size, modification time, inode and
change time (``st_ctime``, which no copying tool can set back: a file replaced by one of
the same size with its modification time kept, as ``cp -p`` and ``rsync -a`` do, still
differs); when any of them changes the cache is rebuilt, so a stale cache is never used.
A damaged cache (a manifest that is not JSON, an array cut short) is rebuilt likewise.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from svhn.errors import SvhnError
from svhn.paths import CACHE_DIR
from svhn.tempfiles import sweep_stale

__all__ = ["default_cache_dir", "DEFAULT_IMAGE_SIZE", "ImageCache", "ImageReadError",
           "read_resized", "read_rgb"]

# 2: files fingerprinted with their inode and change time too; 3: EXIF orientation applied,
# large JPEGs decoded at a reduced scale
_CACHE_VERSION = 3
DEFAULT_IMAGE_SIZE = (64, 128)  # (height, width) a model reads unless a config says otherwise
_TMP_MARK = ".tmp"  # <stem>.tmp<pid>.npy: a cache being built by process <pid>
_EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a photo is turned


class ImageReadError(SvhnError, ValueError):
    """An image file that cannot be decoded."""


class CacheSpaceError(SvhnError, OSError):
    """The disk cannot hold the image cache."""


def _reserve(path: Path, message) -> None:
    """Allocate every block of a (sparse) file now, so writing it through a memory map can
    never meet a full disk (which would be SIGBUS, not an error)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise CacheSpaceError(message()) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # e.g. tmpfs, some NFS
                raise


def read_rgb(path: str | Path, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image of any mode into an RGB uint8 HWC array, as the image really is:
    upright as its EXIF orientation says (a phone's photo), RGB, RGBA (alpha dropped), grey,
    palette, CMYK, and 16-bit or 32-bit grey scaled to 8 bits (Pillow's own conversion
    clips those to white). ``at_least`` (height, width): the size it will be shrunk to, so
    a large JPEG is decoded at the smallest of its DCT scales (1/2 .. 1/8) still larger
    than that, not at full size for nothing."""
    return _decode(Path(path), at_least)[0]


def _decode(path: Path, at_least: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_rgb``'s array and the image's full upright size (width, height)."""
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty (0-byte) image file; re-copy it from the dataset.")
    try:
        with Image.open(path) as img:
            quarter_turn = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            full = img.size[::-1] if quarter_turn else img.size
            if at_least is not None and img.format == "JPEG":
                side = max(at_least)  # either way up: draft works before the rotation
                img.draft("RGB", (side, side))
            upright = ImageOps.exif_transpose(img)
            return _as_rgb(upright), (int(full[0]), int(full[1]))
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: too many pixels to be a house-number photo ({err}); "
                             "remove it from the split or shrink it.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({err}); re-copy it.") from None


def _as_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PNG opens as I;16 or I): the top 8 bits are the 8-bit image.
        grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":  # float grey (TIFF): 0-1 if it fits there, else 0-255
        grey = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(grey, initial=0.0) <= 1.0 else 1.0
        grey = np.nan_to_num(grey * scale).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_resized(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (``read_rgb``) and resize to ``size`` = (height, width); also return the
    image's full upright size (width, height), in whose pixels its labels' boxes are."""
    rgb, original = _decode(Path(path), size)
    height, width = size
    resized = Image.fromarray(rgb).resize((width, height), Image.BILINEAR)
    return np.asarray(resized), original


def default_cache_dir(data_dir: str | Path, root: str | Path = CACHE_DIR) -> Path:
    """A writable cache folder per dataset (the dataset folder itself may be read-only)."""
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return Path(root) / f"{Path(data_dir).name}-{key}"


def _fingerprint(paths: Sequence[Path]) -> list[list]:
    """What says a file is the one cached: from one ``stat`` per file, as before."""
    stats = [p.stat() for p in paths]
    return [[p.name, s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns]
            for p, s in zip(paths, stats)]


def _array_intact(path: Path, shape: tuple[int, ...]) -> bool:
    """The ``.npy`` file holds a whole uint8 array of ``shape`` (its header says so and the
    file is as long as the header says): a copy cut short is not taken for a cache."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, _, dtype = read_header(handle)
            data_start = handle.tell()
    except (OSError, ValueError, SyntaxError):
        return False
    return (tuple(found_shape) == shape and dtype == np.uint8
            and path.stat().st_size == data_start + int(np.prod(shape)))


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p``, returning the folders it made (outermost first), to undo on failure."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _read_for_cache(args: tuple[Path, tuple[int, int]]) -> tuple[np.ndarray, tuple[int, int]]:
    return read_resized(*args)


class ImageCache:
    """Resized uint8 copies of a list of image files, built once and memory-mapped after."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], cache_file: Path):
        self.paths = [Path(p) for p in paths]
        self.size = (int(size[0]), int(size[1]))
        self.cache_file = Path(cache_file)
        self.manifest_file = self.cache_file.with_suffix(".json")
        self._array: np.ndarray | None = None
        self._original_sizes: np.ndarray | None = None

    def is_fresh(self) -> bool:
        """The cache holds these files, as they are now, whole; else it is to be (re)built."""
        if not (self.cache_file.is_file() and self.manifest_file.is_file()):
            return False
        try:
            manifest = json.loads(self.manifest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False  # damaged (a disk filled, a copy cut short): rebuilt
        if not isinstance(manifest, dict):
            return False
        return (
            manifest.get("version") == _CACHE_VERSION
            and manifest.get("size") == list(self.size)
            and manifest.get("files") == _fingerprint(self.paths)
            and len(manifest.get("original_sizes") or ()) == len(self.paths)
            and _array_intact(self.cache_file, (len(self.paths), *self.size, 3))
        )

    def build(self, num_workers: int = 0, desc: str = "caching images") -> None:
        """Decode every image once into the cache (skipped when the cache is fresh).

        The array is written to a temporary file named after this process and renamed into
        place when complete; a failed build removes it, and a build killed outright leaves
        it for the next build of the same cache to sweep (its process no longer runs).
        """
        if self.is_fresh():
            return
        self.sweep_stale_temporaries()  # a killed build's leftovers first: they take room
        self._check_space()  # before any folder or file is made
        made = _make_folders(self.cache_file.parent)
        tmp_file = self._temporary(self.cache_file, ".npy")
        tmp_manifest = self._temporary(self.manifest_file, ".json")
        try:
            originals = self._decode_into(tmp_file, num_workers, desc)
            manifest = {
                "version": _CACHE_VERSION,
                "size": list(self.size),
                "files": _fingerprint(self.paths),
                "original_sizes": originals.tolist(),
            }
            # Array first, manifest last: a cache without a matching manifest is never
            # trusted.
            os.replace(tmp_file, self.cache_file)
            tmp_manifest.write_text(json.dumps(manifest))
            os.replace(tmp_manifest, self.manifest_file)
        except BaseException:  # an unreadable image, a signal: no folder made for nothing
            for leftover in (tmp_file, tmp_manifest):
                leftover.unlink(missing_ok=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only ever removes an empty folder
            raise
        finally:  # on success both were renamed away; on any failure nothing stays behind
            for leftover in (tmp_file, tmp_manifest):
                leftover.unlink(missing_ok=True)

    def _decode_into(self, tmp_file: Path, num_workers: int, desc: str) -> np.ndarray:
        height, width = self.size
        array = np.lib.format.open_memmap(
            tmp_file, mode="w+", dtype=np.uint8, shape=(len(self.paths), height, width, 3)
        )
        _reserve(tmp_file, lambda: self._space_message(self.nbytes(), None))
        originals = np.zeros((len(self.paths), 2), dtype=np.int64)
        jobs = [(p, self.size) for p in self.paths]
        with tqdm(total=len(jobs), desc=desc, unit="img", leave=False) as progress:
            if num_workers > 0 and len(jobs) > 64:
                with ProcessPoolExecutor(num_workers) as pool:
                    results = pool.map(_read_for_cache, jobs, chunksize=32)
                    for i, (img, original) in enumerate(results):
                        array[i], originals[i] = img, original
                        progress.update()
            else:
                for i, job in enumerate(jobs):
                    array[i], originals[i] = _read_for_cache(job)
                    progress.update()
        array.flush()
        del array
        return originals

    def nbytes(self) -> int:
        """What the cache array takes on disk."""
        return len(self.paths) * self.size[0] * self.size[1] * 3

    def _check_space(self) -> None:
        """Refuse before writing when the cache cannot fit: the array is written through a
        memory map, and a full disk under a memory map kills the process (SIGBUS)."""
        needed = self.nbytes() + (1 << 20)  # the .npy header and the manifest
        existing = next(p for p in [self.cache_file.parent, *self.cache_file.parents]
                        if p.exists())
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise CacheSpaceError(self._space_message(needed, free))

    def _space_message(self, needed: int, free: int | None) -> str:
        have = f" ({free:,} free)" if free is not None else ""
        return (f"{self.cache_file.parent}: no room for the image cache: {needed:,} bytes "
                f"needed{have}. Free some space, or put the cache on another disk with "
                "--data.cache_dir (svhn.fit) or --cache_dir (svhn.predict, svhn.report).")

    @staticmethod
    def _temporary(final: Path, suffix: str) -> Path:
        """``<stem>.tmp<pid><suffix>`` beside ``final``: the pid says whose build it is."""
        return final.with_name(f"{final.stem}{_TMP_MARK}{os.getpid()}{suffix}")

    def sweep_stale_temporaries(self) -> list[Path]:
        """Remove temporaries of this cache left by builds whose process is gone (killed
        before they could clean up); a temporary of a build still running is kept."""
        removed = []
        for final in (self.cache_file, self.manifest_file):
            pattern = re.compile(re.escape(final.stem + _TMP_MARK) + r"(\d+)"
                                 + re.escape(final.suffix))
            removed += sweep_stale(final.parent, f"{final.stem}{_TMP_MARK}*{final.suffix}",
                                   pattern)
        return removed

    @property
    def array(self) -> np.ndarray:
        """(N, H, W, 3) uint8, memory-mapped; opened lazily so each worker maps it itself."""
        if self._array is None:
            if not self.is_fresh():
                raise RuntimeError(f"{self.cache_file}: cache missing or stale; call build().")
            self._array = np.load(self.cache_file, mmap_mode="r")
        return self._array

    @property
    def original_sizes(self) -> np.ndarray:
        """(N, 2) original (width, height) of each image, for scaling boxes."""
        if self._original_sizes is None:
            manifest = json.loads(self.manifest_file.read_text())
            self._original_sizes = np.asarray(manifest["original_sizes"], dtype=np.int64)
        return self._original_sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        # Workers re-open the memory map instead of receiving a pickled copy of the pixels.
        state = self.__dict__.copy()
        state["_array"] = None
        return state
