import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.layout import read_labels, write_layout, write_split
from PIL import Image

from svhn.data.datamodule import SVHNDataModule
from svhn.data.images import ImageReadError
from svhn.data.labels import BLANK, load_labels
from svhn.data.layout import DataError, list_split


def datamodule(root, tmp_path, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return SVHNDataModule(str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


@pytest.fixture
def small_layout(tmp_path):
    """Train and val of 40x20 images, one 8x15 box per digit; 3 unlabelled test-A images."""
    root = write_layout(tmp_path / "data",
                        train={"000000.png": [1, 9], "000001.png": [2], "000002.png": [3, 4, 5]},
                        val={"000000.png": [7], "000001.png": [8, 0]})
    return write_split(root, "test_a", [f"{i:06d}.png" for i in range(3)], size=(30, 15),
                       image=(0, 0, 0))


def test_batches_carry_images_targets_lengths_boxes_and_names(small_layout, tmp_path):
    dm = datamodule(small_layout, tmp_path, augment="baseline")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 64, 128) and batch["image"].dtype == torch.uint8
    assert batch["target"].shape == (3, 5)
    by_name = dict(zip(batch["file_name"], batch["target"].tolist()))
    assert by_name["000000.png"] == [1, 9, BLANK, BLANK, BLANK]
    assert sorted(batch["length"].tolist()) == [1, 2, 3]
    assert ((batch["box"] >= 0) & (batch["box"] <= 1)).all()


def test_eval_is_deterministic_and_boxes_match_labels(small_layout, tmp_path):
    dm = datamodule(small_layout, tmp_path)
    val = dm.dataset("val")
    first, again = val[1], val[1]
    assert torch.equal(first["image"], again["image"])
    # 000001.png: 2 digits, left 5..23 of 40 px, top 2..17 of 20 px.
    assert torch.allclose(first["box"], torch.tensor([5 / 40, 2 / 20, 23 / 40, 17 / 20]))


def test_train_on_train_and_val_is_one_setting(small_layout, tmp_path):
    dm = datamodule(small_layout, tmp_path, train_on=("train", "val"))
    dm.setup("fit")
    assert len(dm.train_set) == 5


def test_predict_split_has_names_and_no_targets(small_layout, tmp_path):
    dm = datamodule(small_layout, tmp_path)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["file_name"] == ["000000.png", "000001.png", "000002.png"]
    assert (batch["length"] == 0).all()


def test_long_labels_left_out_with_warning_unless_max_len_allows(tmp_path):
    root = write_split(tmp_path / "d", "train", {"a.png": [1, 2, 3, 4, 5, 6], "b.png": [1]})
    with pytest.warns(UserWarning, match="left out 1 image"):
        assert len(list_split(root, "train", max_len=5).samples) == 1
    assert len(list_split(root, "train", max_len=6).samples) == 2


def test_missing_data_dir_and_split_are_clear_errors(tmp_path, small_layout):
    with pytest.raises(DataError, match="data folder not found.*Download"):
        list_split(tmp_path / "nowhere", "train")
    os.rename(small_layout / "mchar_val", small_layout / "moved")
    with pytest.raises(DataError, match="mchar_val: image folder for split 'val' not found"):
        list_split(small_layout, "val")
    with pytest.raises(DataError, match="unknown split"):
        list_split(small_layout, "test_b")


def test_listed_but_missing_images_give_count_and_names(small_layout):
    (small_layout / "mchar_train" / "000001.png").unlink()
    (small_layout / "mchar_train" / "000002.png").unlink()
    with pytest.raises(DataError, match=r"2 labelled image\(s\) are missing.*000001\.png"):
        list_split(small_layout, "train")


def test_unlabelled_images_are_warned_and_ignored(small_layout):
    Image.new("RGB", (5, 5)).save(small_layout / "mchar_train" / "extra.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) have no entry.*extra\.png"):
        files = list_split(small_layout, "train")
    assert "extra.png" not in [p.name for p in files.image_paths]


@pytest.mark.parametrize("content", [b"", b"not a png at all"])
def test_corrupt_or_empty_image_names_the_file(small_layout, tmp_path, content):
    bad = small_layout / "mchar_train" / "000001.png"
    bad.write_bytes(content)
    dm = datamodule(small_layout, tmp_path)
    with pytest.raises(ImageReadError, match=str(bad)):
        dm.prepare_data()


def test_eval_sampler_sees_each_item_exactly_once_across_ranks(small_layout, tmp_path):
    dm = datamodule(small_layout, tmp_path)
    data = list(range(11))
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        seen += list(dm._eval_sampler(data))
    assert sorted(seen) == data  # no repeats: each validation image counted once


def test_each_dataloader_worker_draws_its_own_augmentations(easy_data_dir, tmp_path):
    # Eight copies of one image: without per-worker seeding, forked workers replay the same
    # augmentation stream and the first batch of each worker would be identical.
    source = easy_data_dir / "mchar_train" / "000000.png"
    copies = {f"{i:06d}.png": read_labels(easy_data_dir / "mchar_train.json")["000000.png"]
              for i in range(8)}
    root = write_layout(tmp_path / "same", train=copies, val=copies,
                        image=lambda name: Image.open(source))
    data = SVHNDataModule(str(root), image_size=(32, 64), num_workers=2, batch_size=1,
                          augment="baseline", augment_on="cpu",
                          cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    first_of_worker0, first_of_worker1 = next(batches)["image"], next(batches)["image"]
    del batches  # stops the workers
    assert not torch.equal(first_of_worker0, first_of_worker1)

def test_synthetic_fallback_says_where_it_looked(tmp_path, capsys):
    # The autouse fixture runs each test in its tmp_path: data/mchar is absent here.
    dm = SVHNDataModule(synthetic_fallback=True, synthetic_size=8, num_workers=0)
    out = capsys.readouterr().out
    assert "NO COMPETITION DATA" in out and str(tmp_path / "data" / "mchar") in out
    dm.prepare_data()
    assert len(list(Path("data/synthetic/mchar_train").glob("*.png"))) == 8
    stamp = Path("data/synthetic/mchar_train.json").stat().st_mtime_ns
    SVHNDataModule(synthetic_fallback=True, synthetic_size=8, num_workers=0).prepare_data()
    assert Path("data/synthetic/mchar_train.json").stat().st_mtime_ns == stamp  # made once


def test_a_named_data_dir_never_falls_back(tmp_path):
    dm = SVHNDataModule("no_such_dir", synthetic_fallback=True, synthetic_size=8,
                        num_workers=0)
    assert not dm.uses_synthetic_fallback
    with pytest.raises(DataError, match="no_such_dir: data folder not found"):
        dm.prepare_data()
    assert not (tmp_path / "data").exists()


def test_missing_data_without_fallback_is_an_error(tmp_path):
    dm = SVHNDataModule(str(tmp_path / "none"), num_workers=0)
    with pytest.raises(DataError, match="data folder not found"):
        dm.prepare_data()


@pytest.mark.real_data
def test_real_data_loads_every_image_and_matches_label_statistics(tmp_path):
    root = os.environ.get("SVHN_DATA_DIR")
    if not root:
        pytest.skip("SVHN_DATA_DIR is not set (point it at the competition layout)")
    dm = SVHNDataModule(root, cache_dir=str(tmp_path / "cache"), num_workers=2,
                        batch_size=256, augment="none")
    dm.prepare_data()
    for split in ("train", "val", "test_a"):
        dataset = dm.dataset(split)
        names, lengths = [], []
        for batch in torch.utils.data.DataLoader(dataset, batch_size=512, num_workers=2):
            assert batch["image"].shape[1:] == (3, 64, 128)
            names += batch["file_name"]
            lengths += batch["length"].tolist()
        on_disk = sorted(p.name for p in (Path(root) / f"mchar_{split}").glob("*.png"))
        assert names == on_disk
        if split != "test_a":
            samples = load_labels(Path(root) / f"mchar_{split}.json")
            assert lengths == [len(s.digits) for s in samples]
            counts = np.bincount(lengths)
            assert counts.sum() == len(samples)
