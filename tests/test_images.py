"""Image reading and the decode-once cache (svhn.data.images)."""

import torch
from helpers.layout import write_split
from PIL import Image

from svhn.data.datamodule import SVHNDataModule
from svhn.data.images import ImageCache, read_rgb
from svhn.data.layout import list_split

LABELS = {"000000.png": [1, 9], "000001.png": [2], "000002.png": [3, 4, 5]}


def test_any_image_mode_becomes_rgb(tmp_path):
    for mode in ("RGBA", "L", "P", "RGB"):
        Image.new(mode, (9, 7)).save(tmp_path / f"{mode}.png")
        assert read_rgb(tmp_path / f"{mode}.png").shape == (7, 9, 3)


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    files = list_split(write_split(tmp_path / "data", "train", LABELS), "train")
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


def test_worker_processes_build_the_same_image_cache(easy_data_dir, tmp_path, monkeypatch):
    # Dataloader workers (num_workers > 0) decode the cache in a process pool: what they
    # build must be what one process builds.
    import svhn.data.images

    pools = []

    class CountingPool(svhn.data.images.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args or kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(svhn.data.images, "ProcessPoolExecutor", CountingPool)
    serial = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0,
                            cache_dir=str(tmp_path / "serial"))
    serial.prepare_data()
    assert pools == []
    parallel = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=2,
                              cache_dir=str(tmp_path / "parallel"))
    parallel.prepare_data()
    assert len(pools) >= 2  # train (300 images) and val (81) were decoded by a pool
    for split in ("train", "val"):
        a, b = serial.dataset(split), parallel.dataset(split)
        assert a.names == b.names
        for i in range(len(a)):
            assert torch.equal(a[i]["image"], b[i]["image"]), (split, a.names[i])
            assert torch.equal(a[i]["box"], b[i]["box"])
