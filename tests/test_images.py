"""Image reading and the decode-once cache (svhn.images)."""

from PIL import Image

from svhn.data import list_split
from svhn.images import ImageCache, read_rgb
from tests.test_data import make_layout

LABELS = {"000000.png": [1, 9], "000001.png": [2], "000002.png": [3, 4, 5]}


def test_any_image_mode_becomes_rgb(tmp_path):
    for mode in ("RGBA", "L", "P", "RGB"):
        Image.new(mode, (9, 7)).save(tmp_path / f"{mode}.png")
        assert read_rgb(tmp_path / f"{mode}.png").shape == (7, 9, 3)


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    files = list_split(make_layout(tmp_path / "data", LABELS), "train")
    cache = ImageCache(files.image_paths, (8, 16), tmp_path / "c" / "train_8x16.npy")
    assert not cache.is_fresh()
    cache.build()
    assert cache.is_fresh()
    assert cache.array.shape == (3, 8, 16, 3)
    assert cache.original_sizes.tolist() == [[40, 20]] * 3
    Image.new("RGB", (40, 21), (255, 255, 255)).save(files.image_paths[0])
    assert not ImageCache(files.image_paths, (8, 16), cache.cache_file).is_fresh()
    rebuilt = ImageCache(files.image_paths, (8, 16), cache.cache_file)
    rebuilt.build()
    assert rebuilt.array[0].min() == 255
