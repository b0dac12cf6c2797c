"""Data loaders on small files written in exactly the real formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import learner.data as data_mod
from learner.data import (
    DATASETS,
    DataNotFoundError,
    decode_image,
    default_cache_dir,
    default_data_root,
    load_dataset,
    read_idx,
)

CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# -- writers for the real formats ------------------------------------------------------------


def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    # CIFAR's files are protocol-2 pickles from Python 2; protocol 2 from Python 3 produces the
    # same numpy globals plus _codecs.encode for bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py with 2 images per data batch and 3 test images."""
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=2)]
        # Batch 5 uses str keys, as Python 2 pickles come back under encoding="latin1".
        keys = ("data", "labels") if i == 5 else (b"data", b"labels")
        write_pickle(folder / f"data_batch_{i}", {keys[0]: x, keys[1]: y, b"batch_label": b"b"})
        xs.append(x)
        ys += y
    tx = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    ty = [9, 0, 4]
    write_pickle(folder / "test_batch", {b"data": tx, b"labels": ty})
    write_pickle(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
    )
    return {"x": np.concatenate(xs), "y": np.array(ys), "tx": tx, "ty": np.array(ty)}


def make_cifar100(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    names = ["apple", "aquarium_fish", "baby", "bear", "beaver"]
    out = {}
    for split, n in (("train", 4), ("test", 2)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, len(names), size=n)]
        # Protocol 5 pickles numpy arrays through _frombuffer: that path must load too.
        write_pickle(
            folder / split,
            {b"data": x, b"fine_labels": y, b"coarse_labels": [0] * n, b"filenames": [b"f"] * n},
            protocol=5,
        )
        out[split] = (x, np.array(y))
    write_pickle(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"]},
        protocol=5,
    )
    return {"names": np.array(names), **out}


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(header + body)
    else:
        path.write_bytes(header + body)


def jpeg_bytes(array_hwc: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def make_jpeg_archives(root: Path) -> None:
    """cifar10-jpeg-{train,test}.tar.gz in the shared layout, classes out of order."""
    members = {"train": {}, "test": {}}
    for split, n in (("train", 3), ("test", 1)):
        for cls, value in (("zebra", 200), ("ant", 40)):
            for i in reversed(range(n)):
                pixels = np.full((32, 32, 3), value + i, dtype=np.uint8)
                members[split][f"{split}/{cls}/{i:04d}.jpg"] = jpeg_bytes(pixels)
    write_tar(root / "cifar10-jpeg-train.tar.gz", members["train"])
    write_tar(root / "cifar10-jpeg-test.tar.gz", members["test"])


def torchvision_reference(path: Path) -> np.ndarray:
    """ImageNet's Resize(256) + CenterCrop(256), computed by torchvision itself."""
    with Image.open(path) as img:
        img = TF.resize(img.convert("RGB"), 256, interpolation=InterpolationMode.BILINEAR)
        return np.asarray(TF.center_crop(img, 256)).transpose(2, 0, 1)


def make_image_tree(folder: Path, rng: np.random.Generator) -> None:
    sizes = {  # (width, height): odd sizes, landscape, portrait, upscaled, already 256
        "train/n03/b.JPEG": (300, 260),
        "train/n03/a.JPEG": (100, 64),
        "train/n01/x.JPEG": (257, 411),
        "train/n02/p.png": (512, 256),
        "val/n01/v.JPEG": (333, 500),
        "val/n03/w.JPEG": (256, 256),
    }
    for rel, (w, h) in sizes.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if rel.endswith(".png"):
            Image.fromarray(pixels[:, :, 0]).save(path)  # grayscale: must become RGB
        else:
            Image.fromarray(pixels).save(path, quality=90)
    (folder / "train/n02/notes.txt").write_text("not an image, ignored")


# -- CIFAR python format ---------------------------------------------------------------------


def test_cifar10_python_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = make_cifar10(tmp_path, rng)
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train.class_names == CIFAR10_NAMES == ds.test.class_names
    assert ds.train.images.shape == (10, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == ref["y"].tolist()
    assert ds.test.labels.tolist() == ref["ty"].tolist()
    # Row layout is R plane, G plane, B plane, each 32x32 row-major.
    x = ref["x"]
    for n, c, row, col in ((0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30)):
        assert ds.train.images[n, c, row, col].item() == x[n, c * 1024 + row * 32 + col]
    assert np.array_equal(ds.test.images.numpy(), ref["tx"].reshape(3, 3, 32, 32))
    assert (ds.mean, ds.std, ds.crop, ds.pad) == (
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        32,
        4,
    )
    assert ds.source == str(tmp_path / "cifar-10-batches-py")


def test_cifar10_planted_pixel(tmp_path: Path) -> None:
    # One bright green pixel at row 5, column 7 of image 1 of batch 3, everything else black.
    rng = np.random.default_rng(1)
    make_cifar10(tmp_path, rng)
    x = np.zeros((2, 3072), dtype=np.uint8)
    x[1, 1024 + 5 * 32 + 7] = 255
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(path, {b"data": x, b"labels": [0, 1]})
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    image = ds.train.images[5]  # batches 1 and 2 hold two images each
    assert image[1, 5, 7].item() == 255
    assert int(image.sum()) == 255
    assert ds.train.images[4].sum().item() == 0


def test_cifar100_python_roundtrip(tmp_path: Path) -> None:
    ref = make_cifar100(tmp_path, np.random.default_rng(2))
    ds = load_dataset("cifar100", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train.class_names == tuple(ref["names"])
    for split, got in (("train", ds.train), ("test", ds.test)):
        x, y = ref[split]
        assert np.array_equal(got.images.numpy(), x.reshape(-1, 3, 32, 32))
        assert got.labels.tolist() == y.tolist()
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    make_cifar10(tmp_path, np.random.default_rng(3))
    marker = tmp_path / "pwned"
    write_pickle(
        tmp_path / "cifar-10-batches-py" / "test_batch",
        {b"data": _Evil(marker), b"labels": [0]},
    )
    with pytest.raises(pickle.UnpicklingError, match=r"refusing.*system"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not any((tmp_path / "cache").iterdir())  # no cache entry, no leftover temp dir


def test_incomplete_cifar_folder_names_missing_files(tmp_path: Path) -> None:
    make_cifar10(tmp_path, np.random.default_rng(4))
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")


def test_download_calls_torchvision_then_reads_with_own_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeCIFAR100:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            make_cifar100(Path(root), np.random.default_rng(5))

    monkeypatch.setattr("torchvision.datasets.CIFAR100", FakeCIFAR100)
    root = tmp_path / "fresh"
    ds = load_dataset("cifar100", root=root, cache_dir=tmp_path / "cache", download=True)
    assert calls == [(str(root), True)]
    assert len(ds.train) == 4
    load_dataset("cifar100", root=root, cache_dir=tmp_path / "cache", download=True)
    assert len(calls) == 1  # folder present: no second download


# -- JPEG archives ---------------------------------------------------------------------------


def test_cifar10_falls_back_to_jpeg_archives(tmp_path: Path) -> None:
    make_jpeg_archives(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train.class_names == ("ant", "zebra")  # sorted like ImageFolder
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test.labels.tolist() == [0, 1]
    # Uniform JPEGs decode to (nearly) their colour, in sorted file order within a class.
    means = ds.train.images.float().mean(dim=(1, 2, 3)).round().tolist()
    assert means == pytest.approx([40, 41, 42, 200, 201, 202], abs=1.5)
    assert "cifar10-jpeg-train.tar.gz" in ds.source


def test_bundled_subset(tmp_path: Path) -> None:
    ds = load_dataset("cifar10-subset", root=tmp_path / "ignored", cache_dir=tmp_path / "cache")
    assert ds.train.images.shape == (1000, 3, 32, 32)
    assert ds.test.images.shape == (200, 3, 32, 32)
    assert ds.train.class_names == CIFAR10_NAMES
    assert ds.train.labels.bincount().tolist() == [100] * 10
    assert ds.test.labels.bincount().tolist() == [20] * 10
    assert (ds.crop, ds.pad, ds.mean) == (32, 4, (0.4914, 0.4822, 0.4465))
    archive = data_mod._REPO / "data" / "cifar10-subset-test.tar.gz"
    with tarfile.open(archive) as tar:
        member = tar.extractfile("test/truck/0019.jpg")
        assert member is not None
        last = decode_image(member.read())
    assert np.array_equal(ds.test.images[-1].numpy(), last)


def test_cache_is_reused_and_tracks_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_jpeg_archives(tmp_path)
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("cifar10-")
    assert sorted(p.name for p in (cache / entries[0]).iterdir()) == [
        "meta.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]

    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data_mod, "decode_image", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # memmap-backed tensors must not warn
        second = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert torch.equal(first.train.images, second.train.images)
    assert sorted(p.name for p in cache.iterdir()) == entries

    monkeypatch.undo()
    archive = tmp_path / "cifar10-jpeg-test.tar.gz"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # changed source: fresh entry


def test_interrupted_decode_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_jpeg_archives(tmp_path)
    cache = tmp_path / "cache"
    real = data_mod.decode_image
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "decode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert len(load_dataset("cifar10", root=tmp_path, cache_dir=cache).train) == 6


# -- ImageFolder trees -----------------------------------------------------------------------


def test_imagenet_tree(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet-subset"
    make_image_tree(folder, np.random.default_rng(6))
    ds = load_dataset("imagenet-subset", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train.class_names == ("n01", "n02", "n03")
    assert ds.train.labels.tolist() == [0, 1, 2, 2]
    assert ds.test.labels.tolist() == [0, 2]
    assert ds.train.images.shape == (4, 3, 256, 256) and ds.test.images.shape == (2, 3, 256, 256)
    assert (ds.crop, ds.pad, ds.mean, ds.std) == (
        224,
        0,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    expected = ["train/n01/x.JPEG", "train/n02/p.png", "train/n03/a.JPEG", "train/n03/b.JPEG"]
    for i, rel in enumerate(expected):
        assert np.array_equal(ds.train.images[i].numpy(), torchvision_reference(folder / rel))
    for i, rel in enumerate(["val/n01/v.JPEG", "val/n03/w.JPEG"]):
        assert np.array_equal(ds.test.images[i].numpy(), torchvision_reference(folder / rel))
    assert ds.source == str(folder)
    # Large caches are memory-mapped, not read into RAM.
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert "train_images.npy" in maps.read_text()


def test_imagenet_tree_at_root_itself(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "tree", np.random.default_rng(7))
    ds = load_dataset("imagenet", root=tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert len(ds.train) == 4 and ds.source == str(tmp_path / "tree")


def test_flat_val_folder_is_explained(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "imagenet", np.random.default_rng(8))
    val = tmp_path / "imagenet" / "val"
    for path in list(val.rglob("*.JPEG")):
        path.rename(val / path.name)
        path.parent.rmdir()
    with pytest.raises(DataNotFoundError, match="synset folders"):
        load_dataset("imagenet", root=tmp_path, cache_dir=tmp_path / "cache")


# -- IDX / Fashion-MNIST ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    ints = np.array([[1, -2], [70000, -300000]], dtype=np.int32)
    write_idx(tmp_path / "images", images, 0x08, compress)
    write_idx(tmp_path / "labels", labels, 0x08, compress)
    write_idx(tmp_path / "ints", ints, 0x0C, compress)
    suffix = ".gz" if compress else ""
    assert np.array_equal(read_idx(tmp_path / f"images{suffix}"), images)
    assert np.array_equal(read_idx(tmp_path / f"labels{suffix}"), labels)
    got = read_idx(tmp_path / f"ints{suffix}")
    assert got.dtype == np.int32 and np.array_equal(got, ints)


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="needs 10"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    folder = tmp_path / "fashion-mnist"
    x = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=5, dtype=np.uint8)
    tx = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    ty = np.array([9, 0, 1], dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", x, 0x08, compress=True)
    write_idx(folder / "train-labels-idx1-ubyte", y, 0x08, compress=False)
    write_idx(folder / "t10k-images-idx3-ubyte", tx, 0x08, compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", ty, 0x08, compress=True)
    ds = load_dataset("fashion-mnist", root=tmp_path, cache_dir=tmp_path / "cache")
    assert np.array_equal(ds.train.images.numpy(), x[:, None])
    assert np.array_equal(ds.test.images.numpy(), tx[:, None])
    assert ds.train.labels.tolist() == y.tolist() and ds.test.labels.tolist() == [9, 0, 1]
    assert ds.train.class_names[0] == "T-shirt/top" and ds.train.class_names[9] == "Ankle boot"
    assert (ds.mean, ds.std, ds.crop, ds.pad) == ((0.2860,), (0.3530,), 28, 4)
    assert ds.source == str(folder)


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST} missing)",
)
def test_debian_fashion_mnist(tmp_path: Path) -> None:
    # An empty root: the loader must find Debian's folder on its own.
    ds = load_dataset("fashion-mnist", root=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.source == str(DEBIAN_FASHION_MNIST)
    assert ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.labels.bincount().tolist() == [6000] * 10
    assert ds.test.labels.bincount().tolist() == [1000] * 10


# -- missing data and bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", ["cifar-10-batches-py", "cifar10-jpeg-train.tar.gz", "download=True"]),
        ("cifar100", ["cifar-100-python", "download=True"]),
        ("imagenet", ["imagenet/train", "train/<synset>"]),
        ("imagenet-subset", ["imagenet-subset/train", "val/"]),
    ],
)
def test_missing_data_names_the_paths(tmp_path: Path, name: str, expected: list[str]) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, root=root, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(root) in message
    for fragment in expected:
        assert fragment in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_fashion_mnist_names_the_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_mod, "_DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("fashion-mnist", root=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "fashion-mnist") in str(info.value)
    assert "no-debian" in str(info.value)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="cifar10-subset"):
        load_dataset("mnist")
    assert "cifar10-subset" in DATASETS


def test_decode_image() -> None:
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    png = jpeg_bytes(pixels, fmt="PNG")  # RGBA, lossless
    rgb = decode_image(png)
    assert rgb.shape == (3, 20, 30) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, pixels[:, :, :3].transpose(2, 0, 1))
    assert decode_image(png, channels=1).shape == (1, 20, 30)
    assert decode_image(png, size=16).shape == (3, 16, 16)
    assert decode_image(png, size=64).shape == (3, 64, 64)
    for bad, reason in (
        (b"", "empty"),
        (b"hello, not an image", "not a decodable image"),
        (jpeg_bytes(pixels[:, :, :3])[:60], "image"),
    ):
        with pytest.raises(ValueError, match=reason):
            decode_image(bad)
    with pytest.raises(ValueError, match="channels"):
        decode_image(png, channels=2)


def test_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BSCE_DATA_DIR", raising=False)
    monkeypatch.delenv("BSCE_CACHE_DIR", raising=False)
    repo = Path(data_mod.__file__).resolve().parent.parent
    assert default_data_root() == repo.parent / "shared" / "data"
    assert default_cache_dir() == repo / ".cache" / "data"
    monkeypatch.setenv("BSCE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("BSCE_CACHE_DIR", str(tmp_path / "c"))
    assert default_data_root() == tmp_path / "d"
    assert default_cache_dir() == tmp_path / "c"
