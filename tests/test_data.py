"""Splits on the real Fashion-MNIST and on image folders written from it: disjoint, stratified, deterministic, the
test set never drawn from the budget, and bad folders refused in one line."""
import os

import pytest
import torch
from helpers import write_image_folder

from fine_tune.errors import DataError
from fine_tune.learn import fashion as fashion_files
from fine_tune.learn import imagefolder
from fine_tune.learn.data import make_splits
from fine_tune.learn.fashion import fashion_mnist
from fine_tune.learn.imagefolder import image_folder


def fashion():
    return fashion_mnist()


def test_splits_are_disjoint_stratified_and_remapped():
    s = make_splits(fashion(), [5, 7, 9], val_per_class=30, budget_per_class=50, test_per_class=100, data_seed=1)
    assert set(s.train.index.tolist()).isdisjoint(s.val.index.tolist())
    for split, per_class in ((s.train, 50), (s.val, 30), (s.test, 100)):
        assert torch.bincount(split.y, minlength=3).tolist() == [per_class] * 3
    assert s.class_names == ["Sandal", "Sneaker", "Ankle boot"]
    assert s.train.x.shape[1:] == (1, 28, 28) and s.train.x.dtype == torch.uint8


def test_test_set_is_the_official_test_images():
    _, _, test_x, test_y, _ = fashion_files.load()
    s = make_splits(fashion(), [0, 1], val_per_class=10, budget_per_class=10)
    assert len(s.test) == 2000  # all 1000 official test images of each class
    assert torch.equal(test_y[s.test.index], torch.tensor([0, 1])[s.test.y])
    assert torch.equal(s.test.x[:, 0], test_x[s.test.index])


def test_classes_by_name_and_resized_images():
    s = make_splits(fashion(), ["Sandal", "Bag"], val_per_class=10, budget_per_class=10, image_size=32)
    assert s.class_names == ["Sandal", "Bag"] and s.train.x.shape[1:] == (1, 32, 32)
    assert s.fingerprint != make_splits(fashion(), ["Sandal", "Bag"], val_per_class=10, budget_per_class=10).fingerprint
    with pytest.raises(DataError, match="class 'Sandals' is not in the data"):
        make_splits(fashion(), ["Sandals", "Bag"], val_per_class=10)


def test_splits_are_deterministic_in_the_data_seed():
    a = make_splits(fashion(), [0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=3)
    b = make_splits(fashion(), [0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=3)
    c = make_splits(fashion(), [0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=4)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.x, b.train.x)
    assert a.fingerprint != c.fingerprint


def test_budget_grows_without_touching_validation():
    small = make_splits(fashion(), [3, 4], val_per_class=25, budget_per_class=10)
    large = make_splits(fashion(), [3, 4], val_per_class=25, budget_per_class=40)
    assert torch.equal(small.val.index, large.val.index)
    assert set(small.train.index.tolist()) <= set(large.train.index.tolist())


def test_explicit_data_dir_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not hold the Fashion-MNIST files"):
        fashion_files.prepare(str(tmp_path / "nowhere"), root=tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_data_dir_with_the_gz_files_is_extracted(tmp_path):
    root = fashion_files.prepare(str(fashion_files.SYSTEM_DIR), root=tmp_path / "root")
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 10008


def test_an_image_folder_holds_the_pngs_it_was_written_from(tmp_path):
    """Real Fashion-MNIST test images written as PNGs in train/ and test/ folders come back pixel for pixel (grey
    decoded as RGB), with their folders as classes; the decoded tensor is cached and reused."""
    root, written = write_image_folder(tmp_path / "images", {"Sandal": 5, "Bag": 8}, per_class=12, test_per_class=4)
    cache = tmp_path / "cache"
    src = image_folder(root, 28, cache)
    assert src.class_names == ["Bag", "Sandal"] and src.val is None
    assert len(src.train.y) == 24 and len(src.test.y) == 8
    for (part, name, i), pixels in written.items():
        images = src.train if part == "train" else src.test
        label = src.class_names.index(name)
        rows = (images.y == label).nonzero().flatten()
        assert torch.equal(images.x[rows[i]], pixels.expand(3, -1, -1)), (part, name, i)
    assert len(list(cache.glob("imagefolder-*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again instead of read from the cache")
    original, imagefolder._decode = imagefolder._decode, no_decoding
    try:
        again = image_folder(root, 28, cache)
    finally:
        imagefolder._decode = original
    assert torch.equal(again.train.x, src.train.x)
    before = set(cache.glob("imagefolder-*.pt"))
    os.utime(next((root / "train" / "Bag").iterdir()), (1, 1))  # a file changed: a new cache entry replaces the old
    image_folder(root, 28, cache)
    assert len(set(cache.glob("imagefolder-*.pt")) - before) == 1 and len(list(cache.glob("imagefolder-*.pt"))) == 1


def test_one_folder_is_split_by_the_data_seed(tmp_path):
    root, _ = write_image_folder(tmp_path / "flat", {"Sneaker": 7, "Shirt": 6}, per_class=20, flat=True)
    s = make_splits(image_folder(root, 32), None, val_per_class=5, budget_per_class=8, test_per_class=4)
    assert s.class_names == ["Shirt", "Sneaker"] and s.train.x.shape[1:] == (3, 32, 32)
    used = [set(x.index.tolist()) for x in (s.train, s.val, s.test)]
    assert not (used[0] & used[1] or used[0] & used[2] or used[1] & used[2])  # three disjoint draws
    assert [len(s.train), len(s.val), len(s.test)] == [16, 10, 8]


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "Bag").mkdir(parents=True), "holds no images"),
    (lambda root: (root / "Bag").mkdir(parents=True) or (root / "Bag" / "x.png").write_bytes(b"not a png"),
     "cannot be read"),
    (lambda root: (root / "test" / "Bag").mkdir(parents=True), "no train/"),
])
def test_bad_image_folders_are_one_line(tmp_path, make, message):
    root = tmp_path / "bad"
    make(root)
    with pytest.raises(DataError, match=message):
        image_folder(root, 28)


def test_fewer_images_than_the_budget_is_refused(tmp_path):
    root, _ = write_image_folder(tmp_path / "small", {"Bag": 8, "Sandal": 5}, per_class=6, flat=True)
    with pytest.raises(DataError, match="class 'Bag' has 6 training images, fewer than the 12 this run needs"):
        make_splits(image_folder(root, 28), None, val_per_class=5, budget_per_class=5, test_per_class=2)
