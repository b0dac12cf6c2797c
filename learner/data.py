"""Real data-set loaders, decoded once into cached uint8 tensors.

Every source is read in its published format (torchvision's CIFAR python pickles, JPEG tar
archives, an ImageFolder tree, IDX files), decoded once into ``(N, C, H, W)`` uint8 arrays and
cached as ``.npy`` files. Later loads memory-map the cache, so training never does per-image
PIL work and a 256x256 ImageNet cache never has to fit in RAM.

Cache layout: ``<cache_dir>/<name>-<fingerprint>/{train,test}_{images,labels}.npy`` plus
``meta.json``. The fingerprint hashes the source paths, sizes and mtimes (and a format version),
so a changed source gets a fresh cache. A cache directory is built under a temporary name and
renamed into place only when complete, so an interrupted decode never leaves a half cache.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct
from numpy._core.numeric import _frombuffer
from tqdm import tqdm

from learner.core.config import AugmentConfig
from learner.core.images import decode_image, training_side

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "Dataset",
    "ImageSet",
    "decode_image",
    "default_cache_dir",
    "default_data_root",
    "load_dataset",
    "read_idx",
]

DATASETS = ("cifar10", "cifar100", "imagenet", "imagenet-subset", "fashion-mnist", "cifar10-subset")

_REPO = Path(__file__).resolve().parent.parent

# Bump when decoding changes (resize rule, layout), so stale caches are not reused.
_CACHE_FORMAT = 1

# Where Debian's dataset-fashion-mnist package installs the IDX files (dpkg -L).
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# ImageNet-style trees are stored at training_side(224, 0) = 256 (shorter side resized, centre
# crop), the rule the server's learn routes apply too (learner.core.images.training_side).
# Same extensions torchvision's ImageFolder accepts, so any tree it reads is read here too.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class ImageSet:
    """One split. ``images`` may be backed by a read-only memory map: never write into it."""

    images: torch.Tensor  # uint8, (N, C, H, W), CPU
    labels: torch.Tensor  # int64, (N,), indices into class_names
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    crop: int  # crop size fed to the network
    pad: int  # zero padding before the random training crop
    source: str  # path(s) read, for result files


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not where they were looked for; the message says where."""


@dataclass(frozen=True)
class _Spec:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: int
    pad: int


_CIFAR10_SPEC = _Spec((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 4)
_IMAGENET_SPEC = _Spec((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, 0)
_SPECS = types.MappingProxyType(
    {
        "cifar10": _CIFAR10_SPEC,
        "cifar10-subset": _CIFAR10_SPEC,
        "cifar100": _Spec((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 4),
        "imagenet": _IMAGENET_SPEC,
        "imagenet-subset": _IMAGENET_SPEC,
        "fashion-mnist": _Spec((0.2860,), (0.3530,), 28, 4),
    }
)


def augment_for(name: str) -> AugmentConfig:
    """The input geometry and normalisation of data set ``name``, without reading its files
    (for a learner that receives its images over the API)."""
    if name not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = _SPECS[name]
    return AugmentConfig(crop=spec.crop, pad=spec.pad, mean=spec.mean, std=spec.std)


@dataclass(frozen=True)
class _Source:
    """A located source: the files that define it and how to decode it into a directory."""

    files: tuple[Path, ...]  # fingerprinted for the cache key
    description: str
    # Writes {train,test}_{images,labels}.npy into the given directory; returns class names.
    decode: Callable[[Path], tuple[str, ...]]


def default_data_root() -> Path:
    """``$BSCE_DATA_DIR`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("BSCE_DATA_DIR")
    return Path(env) if env else _REPO.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """``$BSCE_CACHE_DIR`` if set, else ``<repo>/.cache/data``."""
    env = os.environ.get("BSCE_CACHE_DIR")
    return Path(env) if env else _REPO / ".cache" / "data"


def load_dataset(
    name: str,
    root: Path | None = None,
    cache_dir: Path | None = None,
    download: bool = False,
) -> Dataset:
    """Load a data set by name, decoding it into the cache on first use.

    ``root`` defaults to :func:`default_data_root` (ignored for ``cifar10-subset``, which is
    bundled in the repository). ``download=True`` fetches CIFAR-10/100 with torchvision when
    their folder is missing (needs internet).
    """
    if name not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root) if root is not None else default_data_root()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _locate(name, root, download)
    entry = cache_dir / f"{name}-{_fingerprint(name, source.files)}"
    if not (entry / "meta.json").is_file():
        _build_cache(entry, source)
    spec = _SPECS[name]
    meta = json.loads((entry / "meta.json").read_text())
    class_names = tuple(meta["class_names"])
    return Dataset(
        name=name,
        train=_read_split(entry, "train", class_names),
        test=_read_split(entry, "test", class_names),
        mean=spec.mean,
        std=spec.std,
        crop=spec.crop,
        pad=spec.pad,
        source=meta["source"],
    )


# --------------------------------------------------------------------------------------------
# Single images and IDX files (public helpers, also used by the server)


_IDX_DTYPES = types.MappingProxyType(
    {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (e.g. magic 0x0801 labels, 0x0803 images), plain or gzip-compressed."""
    path = Path(path)
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    # Sniff the gzip magic instead of trusting the suffix: mirrors sometimes unpack without
    # renaming, or rename without unpacking.
    opener: Callable[..., BinaryIO] = gzip.open if gzipped else open  # type: ignore[assignment]
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX body has {len(raw) - header} bytes, shape {dims} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


# --------------------------------------------------------------------------------------------
# Locating sources


def _locate(name: str, root: Path, download: bool) -> _Source:
    if name == "cifar10":
        return _locate_cifar10(root, download)
    if name == "cifar100":
        return _locate_cifar100(root, download)
    if name == "cifar10-subset":
        return _locate_jpeg_archives(
            _REPO / "data" / "cifar10-subset-train.tar.gz",
            _REPO / "data" / "cifar10-subset-test.tar.gz",
            hint="They are part of the repository; regenerate them with scripts/make_subset.py.",
        )
    if name in ("imagenet", "imagenet-subset"):
        return _locate_image_tree(name, root)
    return _locate_fashion_mnist(root)


_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_FILES = ("train", "test", "meta")
_DOWNLOAD_HINT = (
    "Pass root= (or set BSCE_DATA_DIR) to the folder that holds it, or use download=True "
    "(--download on the command line) to fetch it with torchvision where there is internet."
)


def _locate_cifar10(root: Path, download: bool) -> _Source:
    folder = root / _CIFAR10_DIR
    if not folder.is_dir() and download:
        _download_cifar("cifar10", root)
    if folder.is_dir():
        return _cifar_python_source("cifar10", folder)
    train, test = root / "cifar10-jpeg-train.tar.gz", root / "cifar10-jpeg-test.tar.gz"
    if train.is_file() and test.is_file():
        return _locate_jpeg_archives(train, test, hint="")
    raise DataNotFoundError(
        "CIFAR-10 not found. Looked for:\n"
        f"  {folder}/ (torchvision's python format: {', '.join(_CIFAR10_FILES)})\n"
        f"  {train} and {test} (JPEG archives, train/<class>/*.jpg and test/<class>/*.jpg)\n"
        + _DOWNLOAD_HINT
    )


def _locate_cifar100(root: Path, download: bool) -> _Source:
    folder = root / _CIFAR100_DIR
    if not folder.is_dir() and download:
        _download_cifar("cifar100", root)
    if folder.is_dir():
        return _cifar_python_source("cifar100", folder)
    raise DataNotFoundError(
        "CIFAR-100 not found. Looked for:\n"
        f"  {folder}/ (torchvision's python format: {', '.join(_CIFAR100_FILES)})\n"
        + _DOWNLOAD_HINT
    )


def _download_cifar(name: str, root: Path) -> None:
    # torchvision knows the URL and checksum; it verifies the archive before extracting it.
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except Exception as exc:
        raise DataNotFoundError(
            f"downloading {name} into {root} failed ({exc}); without internet, put "
            f"torchvision's {_CIFAR10_DIR if name == 'cifar10' else _CIFAR100_DIR}/ folder there"
        ) from exc


def _cifar_python_source(name: str, folder: Path) -> _Source:
    files = _CIFAR10_FILES if name == "cifar10" else _CIFAR100_FILES
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{folder} is incomplete: missing {', '.join(missing)} "
            f"(torchvision's python format needs {', '.join(files)}). " + _DOWNLOAD_HINT
        )
    paths = tuple(folder / f for f in files)
    decode = _decode_cifar10_python if name == "cifar10" else _decode_cifar100_python
    return _Source(paths, str(folder), lambda out: decode(folder, out))


def _locate_jpeg_archives(train: Path, test: Path, hint: str) -> _Source:
    missing = [p for p in (train, test) if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"JPEG archive(s) not found: {', '.join(map(str, missing))}. {hint}".rstrip()
        )
    return _Source(
        (train, test),
        f"{train}, {test}",
        lambda out: _decode_jpeg_archives(train, test, out),
    )


def _locate_image_tree(name: str, root: Path) -> _Source:
    # Only `root/<name>` and `root` itself: falling back from the subset to a full ImageNet
    # tree would silently decode 1.28M images.
    candidates = (root / name, root)
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            break
    else:
        looked = "\n".join(f"  {c}/train/ and {c}/val/" for c in candidates)
        raise DataNotFoundError(
            f"{name} not found. Looked for an ImageFolder tree (train/<synset>/*.JPEG and "
            f"val/<synset>/*.JPEG) in:\n{looked}\n"
            "Put it there, or pass root= (or set BSCE_DATA_DIR) to the folder that holds it."
        )
    class_names = _tree_classes(folder / "train")
    index = {c: i for i, c in enumerate(class_names)}
    train = _tree_files(folder / "train", class_names, index)
    val = _tree_files(folder / "val", _tree_classes(folder / "val"), index)
    files = tuple(p for p, _ in train) + tuple(p for p, _ in val)
    return _Source(
        files,
        str(folder),
        lambda out: _decode_image_tree(train, val, class_names, out),
    )


def _tree_classes(split_dir: Path) -> tuple[str, ...]:
    classes = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        loose = any(e.is_file() for e in os.scandir(split_dir))
        raise DataNotFoundError(
            f"{split_dir} has no class folders; expected {split_dir}/<synset>/*.JPEG"
            + (
                " (ImageNet's val/ ships flat: sort it into synset folders first, "
                "e.g. with the usual valprep.sh)"
                if loose
                else ""
            )
        )
    return tuple(classes)


def _tree_files(
    split_dir: Path, classes: Sequence[str], index: dict[str, int]
) -> list[tuple[Path, int]]:
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ValueError(f"{split_dir} has classes missing from train/: {', '.join(unknown)}")
    files: list[tuple[Path, int]] = []
    for cls in classes:
        images = sorted(
            e.name
            for e in os.scandir(split_dir / cls)
            if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES)
        )
        if not images:
            raise ValueError(f"{split_dir / cls} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
        files.extend((split_dir / cls / f, index[cls]) for f in images)
    return files


_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _locate_fashion_mnist(root: Path) -> _Source:
    candidates = (root / "fashion-mnist", root, _DEBIAN_FASHION_MNIST)
    for folder in candidates:
        found = [_plain_or_gz(folder / f) for f in _FASHION_MNIST_FILES]
        if all(p is not None for p in found):
            return _fashion_mnist_source(folder, tuple(p for p in found if p is not None))
    looked = "\n".join(f"  {c}/" for c in candidates)
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked for {', '.join(_FASHION_MNIST_FILES)} "
        f"(each plain or .gz) in:\n{looked}\n"
        "Install Debian's package (apt-get install dataset-fashion-mnist) or put the IDX files "
        "in one of those folders."
    )


def _fashion_mnist_source(folder: Path, paths: tuple[Path, ...]) -> _Source:
    return _Source(paths, str(folder), lambda out: _decode_fashion_mnist(paths, out))


def _plain_or_gz(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Decoders: each writes {train,test}_{images,labels}.npy into `out` and returns class names


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    CIFAR's python format is a pickle; an arbitrary pickle runs arbitrary code. Only the
    globals numpy needs to rebuild an array are resolved (``_codecs.encode`` turns the latin-1
    strings of protocol-2 pickles back into bytes; ``_frombuffer`` is what protocol 5 uses).
    """

    _ALLOWED = types.MappingProxyType(
        {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _frombuffer,
            ("numpy._core.numeric", "_frombuffer"): _frombuffer,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR files only hold numpy arrays, "
                "lists and strings"
            ) from None


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    # Python 2 pickles come back with str keys, Python 3 ones with bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"{path}: no {key!r} entry (has {', '.join(map(str, batch))})")
    return batch[key]


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_cifar_pickle(path)
    data = _cifar_field(batch, "data", path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ValueError(f"{path}: 'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' rows have {data.shape[1]} values, not 3072")
    labels = np.asarray(_cifar_field(batch, label_key, path), dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    # Each row is the R, G and B planes in turn, each 32x32 row-major: that is already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_names(path: Path, key: str) -> tuple[str, ...]:
    names = _cifar_field(_load_cifar_pickle(path), key, path)
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _decode_cifar10_python(folder: Path, out: Path) -> tuple[str, ...]:
    names = _cifar_names(folder / "batches.meta", "label_names")
    parts = [_cifar_arrays(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
    _save_split(out, "train", *_concat(parts), len(names))
    _save_split(out, "test", *_cifar_arrays(folder / "test_batch", "labels"), len(names))
    return names


def _decode_cifar100_python(folder: Path, out: Path) -> tuple[str, ...]:
    names = _cifar_names(folder / "meta", "fine_label_names")
    for split in ("train", "test"):
        _save_split(out, split, *_cifar_arrays(folder / split, "fine_labels"), len(names))
    return names


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_tar_images(path: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{class: {file name: bytes}} for the ``<split>/<class>/<file>`` images of a tar.gz."""
    found: dict[str, dict[str, bytes]] = {}
    # Streaming mode: one sequential pass over the gzip stream, nothing extracted to disk.
    with tarfile.open(path, mode="r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "")]
            if len(parts) != 3 or parts[0] != split:
                continue
            if not parts[2].lower().endswith(_IMAGE_SUFFIXES):
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                found.setdefault(parts[1], {})[parts[2]] = handle.read()
    if not found:
        raise ValueError(f"{path}: no images under {split}/<class>/")
    return found


def _decode_jpeg_archives(train: Path, test: Path, out: Path) -> tuple[str, ...]:
    splits = {"train": _read_tar_images(train, "train"), "test": _read_tar_images(test, "test")}
    # Alphabetical, as ImageFolder does; test classes must index into the same list.
    names = tuple(sorted(splits["train"]))
    index = {c: i for i, c in enumerate(names)}
    for split, by_class in splits.items():
        unknown = sorted(set(by_class) - set(index))
        if unknown:
            raise ValueError(f"{split} classes missing from the train archive: {unknown}")
        blobs: list[tuple[str, bytes]] = []
        labels: list[int] = []
        for cls in sorted(by_class):
            for fname in sorted(by_class[cls]):
                blobs.append((f"{split}/{cls}/{fname}", by_class[cls][fname]))
                labels.append(index[cls])
        images = np.empty((len(blobs), 3, 32, 32), dtype=np.uint8)
        for i, (member, blob) in enumerate(_progress(blobs, f"decode {split}")):
            images[i] = _decode_checked(blob, member, (3, 32, 32))
        _save_split(out, split, images, np.asarray(labels, dtype=np.int64), len(names))
    return names


def _decode_checked(blob: bytes, what: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        image = decode_image(blob, channels=shape[0])
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    # A differently sized image means a wrong archive: fail rather than silently resize.
    if image.shape != shape:
        raise ValueError(f"{what}: image is {image.shape}, expected {shape}")
    return image


def _decode_image_tree(
    train: Sequence[tuple[Path, int]],
    val: Sequence[tuple[Path, int]],
    class_names: tuple[str, ...],
    out: Path,
) -> tuple[str, ...]:
    size = training_side(_IMAGENET_SPEC.crop, _IMAGENET_SPEC.pad)
    for split, files in (("train", train), ("test", val)):
        # Written straight into a memory-mapped .npy: ImageNet at 256x256 is ~250 GB.
        images = np.lib.format.open_memmap(
            out / f"{split}_images.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(len(files), 3, size, size),
        )

        def work(i: int, images: np.ndarray = images, files: Sequence = files) -> None:
            path = files[i][0]
            try:
                images[i] = decode_image(path.read_bytes(), size=size)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from exc

        # PIL releases the GIL while decoding and resizing, so threads do scale here.
        workers = max(1, min(8, os.cpu_count() or 1))
        chunk = 512
        with ThreadPoolExecutor(workers) as pool, _bar(len(files), f"decode {split}") as bar:
            for start in range(0, len(files), chunk):
                stop = min(len(files), start + chunk)
                for _ in pool.map(work, range(start, stop)):
                    pass
                bar.update(stop - start)
        images.flush()
        del images
        labels = np.asarray([label for _, label in files], dtype=np.int64)
        _save_split(out, split, None, labels, len(class_names))
    return class_names


def _decode_fashion_mnist(paths: Sequence[Path], out: Path) -> tuple[str, ...]:
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for split, x, y, xp, yp in (
        ("train", train_x, train_y, paths[0], paths[1]),
        ("test", test_x, test_y, paths[2], paths[3]),
    ):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{xp}: expected uint8 (N, 28, 28) images, found {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{yp}: {y.shape} labels for {x.shape[0]} images")
        _save_split(out, split, x[:, None], y.astype(np.int64), len(_FASHION_MNIST_CLASSES))
    return _FASHION_MNIST_CLASSES


# --------------------------------------------------------------------------------------------
# Cache


def _fingerprint(name: str, files: Iterable[Path]) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\0{name}".encode())
    for path in files:
        st = path.stat()
        digest.update(f"\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _save_split(
    out: Path, split: str, images: np.ndarray | None, labels: np.ndarray, num_classes: int
) -> None:
    """Validate and write one split; ``images=None`` when already written as a memmap."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{split} labels range over [{labels.min()}, {labels.max()}] "
            f"but there are {num_classes} classes"
        )
    if images is not None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images, {labels.shape[0]} labels")
        np.save(out / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(out / f"{split}_labels.npy", labels.astype(np.int64, copy=False))


def _build_cache(entry: Path, source: _Source) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Build under a private temporary name, then rename: readers only ever see a complete
    # entry, and two processes decoding at once do not trip over each other.
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        class_names = source.decode(tmp)
        meta = {
            "format": _CACHE_FORMAT,
            "class_names": list(class_names),
            "source": source.description,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(entry)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            if not (entry / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_split(entry: Path, split: str, class_names: tuple[str, ...]) -> ImageSet:
    images = np.load(entry / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)
    labels = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"{entry}: cache for {split} is inconsistent; delete the folder")
    with warnings.catch_warnings():
        # The memmap is read-only and PyTorch warns that writes would be undefined; callers
        # only read (augmentation copies first), and copying would defeat the memmap.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image_tensor = torch.from_numpy(images)
    return ImageSet(image_tensor, torch.from_numpy(labels), class_names)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5)


def _progress(items: Sequence[Any], desc: str) -> Iterable[Any]:
    return tqdm(items, desc=desc, unit="img", file=sys.stderr, mininterval=0.5)
