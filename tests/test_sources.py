"""Dataset adapters on the real Fashion-MNIST files and on small files written in each format."""
import numpy as np
import pytest

from fakes import requires_fmnist, write_fake_cifar, write_fake_fmnist, write_imagefolder
from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.sources import SOURCES, get_source

def cfg(**kw) -> DataConfig:
    return DataConfig(**{"download": False, **kw})


@requires_fmnist
def test_fashion_mnist_from_the_debian_package():
    src = get_source("fashion-mnist")(cfg(dataset="fashion-mnist"))
    assert src.train_images.shape == (60000, 28, 28, 1) and src.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(src.train_labels).tolist() == [6000] * 10
    assert src.class_names[0] == "T-shirt/top" and src.class_names[9] == "Ankle boot"
    assert src.train_images.dtype == np.uint8 and src.train_images.max() == 255


def test_fashion_mnist_from_data_root(tmp_path):
    write_fake_fmnist(tmp_path / "FashionMNIST" / "raw")  # torchvision's layout
    src = get_source("fashion-mnist")(cfg(data_root=str(tmp_path)))
    assert src.train_images.shape == (40, 28, 28, 1) and src.test_labels.tolist()[:3] == [0, 1, 2]


def test_fashion_mnist_missing_names_every_fix(tmp_path):
    with pytest.raises(DataError) as err:
        get_source("fashion-mnist")(cfg(data_root=str(tmp_path)))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.data_root" in msg and "online" in msg


def test_corrupt_idx_file(tmp_path):
    write_fake_fmnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read IDX file"):
        get_source("fashion-mnist")(cfg(data_root=str(tmp_path)))


def test_digits_split_is_fixed_and_stratified():
    a = get_source("digits")(cfg(dataset="digits"))
    b = get_source("digits")(cfg(dataset="digits"))
    assert a.train_images.shape[1:] == (8, 8, 1) and len(a.train_labels) + len(a.test_labels) == 1797
    assert np.array_equal(a.train_labels, b.train_labels)
    assert np.bincount(a.train_labels).min() >= 130 and a.train_images.max() == 255


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, which):
    first = write_fake_cifar(tmp_path, which)
    src = get_source(which)(cfg(dataset=which, data_root=str(tmp_path)))
    expected_classes = 10 if which == "cifar10" else 100
    assert src.num_classes == expected_classes and src.train_images.shape[1:] == (32, 32, 3)
    # CHW rows -> HWC: the red plane is the first 1024 bytes
    assert np.array_equal(src.train_images[0, :, :, 0].reshape(-1), first[0, :1024])
    assert np.array_equal(src.train_images[0, :, :, 2].reshape(-1), first[0, 2048:])


def test_cifar_missing(tmp_path):
    with pytest.raises(DataError, match="cifar10 files not found .* data.data_root"):
        get_source("cifar10")(cfg(dataset="cifar10", data_root=str(tmp_path)))


def test_imagefolder_holds_out_a_stratified_test_split(tmp_path):
    write_imagefolder(tmp_path, {"ant": 10, "bee": 5, "cat": 2})
    src = get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path), test_fraction=0.2))
    assert src.class_names == ["ant", "bee", "cat"]
    assert np.bincount(src.train_labels).tolist() == [8, 4, 1]  # natural counts kept
    assert np.bincount(src.test_labels, minlength=3).tolist() == [2, 1, 1]
    assert src.train_images.shape[1:] == (8, 8, 3)


def test_imagefolder_train_test_folders_and_grey_resize(tmp_path):
    write_imagefolder(tmp_path / "train", {"a": 3, "b": 2}, size=(12, 10))
    write_imagefolder(tmp_path / "test", {"a": 1, "b": 1}, size=(12, 10))
    src = get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path), image_size=6, channels=1))
    assert src.train_images.shape == (5, 6, 6, 1) and src.test_images.shape == (2, 6, 6, 1)


def test_imagefolder_bad_inputs(tmp_path):
    write_imagefolder(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class 'empty' .* has no images"):
        get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path)))
    (tmp_path / "empty").rmdir()
    write_imagefolder(tmp_path, {"c": 2}, size=(9, 9))
    with pytest.raises(DataError, match="different sizes .* data.image_size"):
        get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path)))
    with pytest.raises(DataError, match="needs data.data_root"):
        get_source("imagefolder")(cfg(dataset="imagefolder"))


def test_imagefolder_corrupt_image_policy(tmp_path):
    write_imagefolder(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read image .*broken.png.*data.on_corrupt=skip"):
        get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path)))
    src = get_source("imagefolder")(cfg(dataset="imagefolder", data_root=str(tmp_path), on_corrupt="skip"))
    assert len(src.skipped) == 1 and src.skipped[0].endswith("broken.png")
    assert len(src.train_labels) + len(src.test_labels) == 8


def test_every_registered_source_has_a_loader():
    for name in SOURCES:
        assert callable(get_source(name))
