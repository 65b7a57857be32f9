"""Your own data (issue 14): npz files and image folders, their checks (one line naming the file), the
per-channel standardization, the folder cache, and RGB through augmentation and the partition heatmap."""

import numpy as np
import pytest
import torch

from conftest import own_images, write_image_folder
from fedgap.config import load_config
from fedgap.data import folder as folder_mod
from fedgap.data.datasets import load_dataset, load_dataset_for
from fedgap.errors import ConfigError, DataError
from fedgap.fl.augment import random_affine


def save_npz(path, **overrides):
    (x_train, y_train), (x_test, y_test) = own_images(60), own_images(30, seed=1)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


# ------------------------------------------------------------------------------------------------ npz
def test_npz_rgb_is_standardized_per_channel(own_npz):
    ds = load_dataset_for(load_config(overrides=["data.name=npz", f"data.path={own_npz}"]).data)
    assert ds.train_x.shape == (60, 3, 16, 16) and ds.test_x.shape == (30, 3, 16, 16)
    assert ds.num_classes == 3 and ds.image_shape == (3, 16, 16)
    assert len(ds.mean) == len(ds.std) == 3
    assert torch.allclose(ds.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(ds.train_x.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    x_train = np.load(own_npz)["x_train"]
    expected = (x_train[..., 1] / 255.0 - ds.mean[1]) / ds.std[1]
    assert np.allclose(ds.train_x[:, 1].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(("layout", "shape"), [
    (lambda x: x, (3, 16, 16)),  # N x H x W x 3
    (lambda x: x.transpose(0, 3, 1, 2).astype(np.float32) / 255, (3, 16, 16)),  # N x C x H x W float
    (lambda x: x[..., 0], (1, 16, 16)),  # N x H x W
    (lambda x: np.concatenate([x, x[..., :2]], axis=3).transpose(0, 3, 1, 2), (5, 16, 16)),  # 5 channels: axis 1
])
def test_npz_layouts(tmp_path, layout, shape):
    x_train, x_test = own_images(60)[0], own_images(30, seed=1)[0]
    path = save_npz(tmp_path / "d.npz", x_train=layout(x_train), x_test=layout(x_test))
    assert load_dataset("npz", None, path).image_shape == shape


NAN = own_images(60)[0].astype(np.float32)
NAN[7, 1, 1, 1] = np.nan


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(y_test=None), "missing array(s) y_test"),
    (dict(y_train=np.zeros(59, np.int64)), "train images (60, 3, 16, 16) and labels (59,) do not match"),
    (dict(y_train=np.zeros(60, np.float32)), "train labels are float32; expected integers 0..K-1"),
    (dict(y_test=-np.ones(30, np.int64)), "test label -1 is negative"),
    (dict(y_test=np.full(30, 5)), "class 3 has no training samples"),
    (dict(x_train=NAN, x_test=NAN[:30]), "train image 7 holds NaN or inf values"),
    (dict(x_train=own_images(60)[0].astype(np.int32)), "train images are int32; expected uint8 or float"),
    (dict(x_test=own_images(30, size=12)[0]), "train images are C x H x W = (3, 16, 16), test images (3, 12, 12)"),
    (dict(x_train=np.zeros((60, 2, 3, 4, 5), np.uint8)), "expected N x H x W, N x H x W x C or N x C x H x W"),
])
def test_bad_npz_is_one_line_naming_the_file(tmp_path, overrides, message):
    path = save_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError) as err:
        load_dataset("npz", None, path)
    assert path in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_npz_file_errors_and_config_keys(tmp_path):
    with pytest.raises(DataError, match="'.*nowhere.npz': not found"):
        load_dataset("npz", None, str(tmp_path / "nowhere.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz': not a readable .npz file"):
        load_dataset("npz", None, str(tmp_path / "junk.npz"))
    with pytest.raises(ConfigError, match="data.path: required when data.name=npz"):
        load_config(overrides=["data.name=npz"])
    with pytest.raises(ConfigError, match="data.root: required when data.name=folder"):
        load_config(overrides=["data.name=folder"])
    with pytest.raises(ConfigError, match="data.path: only read when data.name=npz"):
        load_config(overrides=["data.path=x.npz"])


# ------------------------------------------------------------------------------------------------ folders
def test_folder_rgb_classes_in_sorted_order_and_the_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path, train=12, test=6)
    ds = load_dataset("folder", str(tmp_path))
    labels = own_images(12)[1]
    assert ds.image_shape == (3, 16, 16) and ds.num_classes == 3
    assert sorted(ds.train_y.tolist()) == sorted(labels.tolist())  # apple, banana, cherry = 0, 1, 2
    caches = list(tmp_path.glob(".fedgap-cache-*.npz"))
    assert len(caches) == 1
    monkeypatch.setattr(folder_mod, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    load_dataset.cache_clear()
    again = load_dataset("folder", str(tmp_path))
    assert torch.equal(again.train_x, ds.train_x)
    monkeypatch.undo()
    (tmp_path / "test" / "apple" / "000.png").unlink()  # a changed folder gets a new cache, the old one goes
    load_dataset.cache_clear()
    assert len(load_dataset("folder", str(tmp_path)).test_y) == 5
    assert len(list(tmp_path.glob(".fedgap-cache-*.npz"))) == 1 and not caches[0].exists()


def test_grey_folder_has_one_channel(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("0", "1"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 10), 40 * i + int(label) * 100, np.uint8)).save(
                    tmp_path / split / label / f"{i}.jpg")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.image_shape == (1, 8, 10) and ds.num_classes == 2


def _resize_one(root):
    from PIL import Image

    Image.new("RGB", (12, 16)).save(root / "train" / "banana" / "001.png")
    return "banana/001.png': 12 x 16 pixels, other images are 16 x 16"


def _corrupt_one(root):
    (root / "test" / "cherry" / "002.png").write_bytes(b"\x89PNG broken")
    return "cherry/002.png': not a readable image"


def _unknown_test_class(root):
    (root / "test" / "durian").mkdir()
    return "test class folder 'durian' has no folder in train/"


def _empty_class(root):
    (root / "train" / "elderberry").mkdir()
    return "class folder 'train/elderberry' holds no .png or .jpg image"


def _no_test(root):
    import shutil

    shutil.rmtree(root / "test")
    return "no folder 'test/'"


@pytest.mark.parametrize("damage", [_resize_one, _corrupt_one, _unknown_test_class, _empty_class, _no_test])
def test_bad_folder_is_one_line_naming_the_file(tmp_path, damage):
    write_image_folder(tmp_path, train=6, test=3)
    message = damage(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("folder", str(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ RGB downstream
def test_augmentation_moves_every_channel_alike():
    x = torch.rand(4, 3, 16, 16)
    out = random_affine(x, torch.Generator().manual_seed(3))
    per_channel = [random_affine(x[:, c : c + 1], torch.Generator().manual_seed(3)) for c in range(3)]
    assert out.shape == x.shape and torch.allclose(out, torch.cat(per_channel, 1), atol=1e-6)


def test_heatmap_takes_many_classes():
    import matplotlib.pyplot as plt

    from fedgap.report.plots import partition_heatmap_figure

    fig = partition_heatmap_figure(np.ones((5, 100), np.int64))
    assert len(fig.axes[0].get_xticks()) <= 20
    plt.close(fig)
