"""Splits on the real Fashion-MNIST: disjoint, stratified, deterministic, test set = official test images."""
import torch

from fine_tune import data
from fine_tune.data import make_splits


def test_splits_are_disjoint_stratified_and_remapped():
    s = make_splits([5, 7, 9], val_per_class=30, budget_per_class=50, test_per_class=100, data_seed=1)
    assert set(s.train.index.tolist()).isdisjoint(s.val.index.tolist())
    for split, per_class in ((s.train, 50), (s.val, 30), (s.test, 100)):
        assert torch.bincount(split.y, minlength=3).tolist() == [per_class] * 3
    assert s.class_names == ["Sandal", "Sneaker", "Ankle boot"]
    assert s.train.x.shape[1:] == (1, 28, 28) and s.train.x.dtype == torch.float32


def test_test_set_is_the_official_test_images():
    _, _, test_x, test_y, _ = data.load()
    s = make_splits([0, 1], val_per_class=10, budget_per_class=10)
    assert len(s.test) == 2000  # all 1000 official test images of each class
    assert torch.equal(test_y[s.test.index], torch.tensor([0, 1])[s.test.y])
    assert torch.allclose(s.test.x, data._normalise(test_x[s.test.index]))


def test_splits_are_deterministic_in_the_data_seed():
    a = make_splits([0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=3)
    b = make_splits([0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=3)
    c = make_splits([0, 1, 2], val_per_class=20, budget_per_class=20, data_seed=4)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.x, b.train.x)
    assert a.fingerprint != c.fingerprint


def test_budget_grows_without_touching_validation():
    small = make_splits([3, 4], val_per_class=25, budget_per_class=10)
    large = make_splits([3, 4], val_per_class=25, budget_per_class=40)
    assert torch.equal(small.val.index, large.val.index)
    assert set(small.train.index.tolist()) <= set(large.train.index.tolist())


def test_explicit_data_dir_without_files_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(data.DataError, match="does not hold the Fashion-MNIST files"):
        data.prepare(str(tmp_path / "nowhere"), root=tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_data_dir_with_the_gz_files_is_extracted(tmp_path):
    root = data.prepare(str(data.SYSTEM_DIR), root=tmp_path / "root")
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 10008
