"""Copy a small, deterministic CIFAR-10 subset into the repository.

From the shared JPEG archives (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``) take the
first 100 train and 20 test images of each class, by sorted file name, bytes unchanged, and write
them to ``data/cifar10-subset-{train,test}.tar.gz`` with the same inner layout. The subset feeds
the demo and the fast tests, which must run on a fresh checkout without ../shared.

The output is byte-for-byte reproducible: members are written in sorted order with mtime 0 and
neutral ownership, and the gzip header carries no name and mtime 0.

    .venv/bin/python scripts/make_subset.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
PER_CLASS = {"train": 100, "test": 20}
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def read_split(archive: Path, split: str, per_class: int) -> dict[str, list[tuple[str, bytes]]]:
    """Return {class: [(file name, bytes), ...]} holding the first `per_class` files by name."""
    # Archive order is whatever the packer produced; sort names first so the pick is stable.
    found: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "")]
            if len(parts) != 3 or parts[0] != split:
                continue
            _, cls, fname = parts
            if not fname.lower().endswith(IMAGE_SUFFIXES):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            found.setdefault(cls, {})[fname] = handle.read()
    if not found:
        raise SystemExit(f"{archive}: no {split}/<class>/*.jpg members")
    picked: dict[str, list[tuple[str, bytes]]] = {}
    for cls in sorted(found):
        names = sorted(found[cls])
        if len(names) < per_class:
            raise SystemExit(f"{archive}: class {cls!r} has {len(names)} images, need {per_class}")
        picked[cls] = [(name, found[cls][name]) for name in names[:per_class]]
    return picked


def _tarinfo(name: str, *, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o644
    return info


def write_split(out: Path, split: str, picked: dict[str, list[tuple[str, bytes]]]) -> None:
    # Build in memory and rename into place, so an interrupted run never leaves a torn archive.
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(_tarinfo(f"{split}/", directory=True))
        for cls, files in picked.items():
            tar.addfile(_tarinfo(f"{split}/{cls}/", directory=True))
            for fname, data in files:
                tar.addfile(_tarinfo(f"{split}/{cls}/{fname}", size=len(data)), io.BytesIO(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "data")
    args = parser.parse_args(argv)
    for split, per_class in PER_CLASS.items():
        picked = read_split(args.src / f"cifar10-jpeg-{split}.tar.gz", split, per_class)
        out = args.out / f"cifar10-subset-{split}.tar.gz"
        write_split(out, split, picked)
        total = sum(len(files) for files in picked.values())
        print(f"{out}: {total} images, {len(picked)} classes, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
