"""Base models: version 0 from a trained network instead of a random one.

    python -m learner.base train [--dataset cifar10] [--classes bird,cat,deer,dog,frog,horse]
                                 [--backbone resnet32] [--epochs 6] [--exemplars-per-class 200]
                                 [--seed 1993] [--device auto] [--threads 2] [--out FILE]
    python -m learner.base import --checkpoint FILE --class-names a,b,c
                                  [--backbone resnet32|resnet18] [--exemplars DIR] [--out FILE]

``train`` trains a network on chosen classes of a data set with the learner's own
``train_step`` (one step from an untrained network, the offline runner's first step) and
measures its accuracy on those classes' test images. ``import`` turns an existing checkpoint
into the same kind of file: a safetensors state dict of ``IncrementalNet``, or a torchvision
ResNet-18 checkpoint (read with ``torch.load(weights_only=True)`` only), with class names and,
optionally, exemplar images from an ImageFolder-style directory ``DIR/<class>/*.png|jpg``.

A base-model file is one safetensors file, never a pickle:

- tensors: the version payload exactly as ``version_payload`` writes it (``model.*``,
  ``nme.class_means``, ``rng.state``), plus ``exemplars.<i>``: uint8 ``(n, C, H, W)`` images of
  head class ``i``, best exemplar first (herding order, so a smaller budget keeps a prefix);
- header: ``format`` = ``bsce-serve/base-model-1`` and ``version``, the version metadata as
  JSON (class names in head order, model and augmentation config, the training config, seed,
  test accuracy, the command that wrote it).

``load_base`` reads and validates such a file; ``base_version0`` turns it into version 0 of a
deployment (``learner.worker``: ``--base-model``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from learner.core.config import AugmentConfig, MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.evaluate import class_means_from_features, infer, nme_predict
from learner.core.images import decode_image
from learner.core.machine import describe_machine, resolve_device
from learner.core.model import IncrementalNet
from learner.core.versioning import load_version, version_payload

BASE_FORMAT = "bsce-serve/base-model-1"
EXEMPLAR_PREFIX = "exemplars."
_MODEL_PREFIX = "model."

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE_MODEL = _REPO / "models" / "base-cifar10-animals.safetensors"
# The six animal classes of CIFAR-10; the four vehicles are left for users to post.
DEFAULT_CLASSES = ("bird", "cat", "deer", "dog", "frog", "horse")
# About 70 s an epoch of 30,000 images for ResNet-32 on 2 idle AVX-512 cores: the default
# base trains in about 7.5 minutes there (models/README.md has the committed one's figures).
DEFAULT_EPOCHS = 6
# 200 per class is the share of the worker's default memory (2,000 exemplars, fixed_total)
# once all ten CIFAR-10 classes are known. A base class's data is gone after version 0, so
# it can never get more exemplars than the file brings; fewer would leave the base classes
# under-represented against posted ones for good. Cost: 6 x 200 x 3 KiB = 3.5 MiB.
DEFAULT_EXEMPLARS_PER_CLASS = 200
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


class BaseModelError(ValueError):
    """A base-model file or checkpoint that cannot become version 0; the message says why."""


# --------------------------------------------------------------------------------------------
# The file


def write_base(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    exemplars: Mapping[int, torch.Tensor | np.ndarray] | None = None,
) -> Path:
    """Write a base-model file atomically; it is checked with `load_base` before it replaces
    ``path``. ``tensors`` and ``metadata`` are a version payload (`version_payload`)."""
    path = Path(path)
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for c, x in (exemplars or {}).items():
        out[f"{EXEMPLAR_PREFIX}{int(c)}"] = torch.as_tensor(np.ascontiguousarray(x)).contiguous()
    header = {"format": BASE_FORMAT, "version": json.dumps(dict(metadata))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=header)
    tmp.chmod(0o644)  # safetensors creates it private; this file is meant to be shared
    try:
        load_base(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def load_base(
    path: Path | str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[int, np.ndarray]]:
    """Read and validate a base-model file.

    Returns the version payload (tensors and metadata, as `load_version` takes them) and the
    exemplars: head class index -> uint8 ``(n, C, H, W)``. Raises `BaseModelError` for a
    missing file, a file that is not safetensors (a pickle is never opened), a safetensors
    file without the base-model header, class names that do not match the head, weights that
    do not load, or exemplars of the wrong type, shape or class.
    """
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"no base-model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BaseModelError(
            f"{path} is not a safetensors file ({exc}). A base model is a safetensors file "
            "written by `python -m learner.base`; pickles are never loaded (turn a checkpoint "
            "into a base model with `python -m learner.base import`)"
        ) from None
    if header.get("format") != BASE_FORMAT:
        raise BaseModelError(
            f"{path} is a safetensors file but not a base model (header format "
            f"{header.get('format')!r}, expected {BASE_FORMAT!r}); turn a state dict into one "
            "with `python -m learner.base import --checkpoint FILE --class-names ...`"
        )
    try:
        metadata = json.loads(header.get("version", ""))
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{path}: the version metadata is not JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise BaseModelError(f"{path}: the version metadata is not a JSON object")
    names = _check_names(metadata.get("class_names"), f"{path}")
    exemplar_keys = [k for k in tensors if k.startswith(EXEMPLAR_PREFIX)]
    payload = {k: v for k, v in tensors.items() if k not in exemplar_keys}
    head = payload.get(f"{_MODEL_PREFIX}head.weight")
    if head is None:
        raise BaseModelError(f"{path} holds no classifier head ({_MODEL_PREFIX}head.weight)")
    if head.shape[0] != len(names):
        raise BaseModelError(
            f"{path}: the head has {head.shape[0]} rows (classes) but the file names "
            f"{len(names)} classes ({', '.join(names)})"
        )
    try:
        loaded = load_version(payload, metadata)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BaseModelError(f"{path}: the weights do not load: {_short(exc)}") from None
    if loaded.model.num_classes != len(names):
        raise BaseModelError(
            f"{path}: the model has {loaded.model.num_classes} classes but the file names "
            f"{len(names)}"
        )
    chw = loaded.image_shape
    exemplars: dict[int, np.ndarray] = {}
    for key in exemplar_keys:
        suffix = key[len(EXEMPLAR_PREFIX) :]
        if not suffix.isdigit() or int(suffix) >= len(names):
            raise BaseModelError(
                f"{path}: exemplar tensor {key!r} names no class of the head "
                f"(classes 0 to {len(names) - 1})"
            )
        x = tensors[key]
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != chw or x.shape[0] < 1:
            raise BaseModelError(
                f"{path}: exemplars of class {suffix} ({names[int(suffix)]}) must be uint8 "
                f"(n >= 1, {', '.join(map(str, chw))}), got {x.dtype} {tuple(x.shape)}"
            )
        exemplars[int(suffix)] = x.numpy()
    return payload, metadata, dict(sorted(exemplars.items()))


def _check_names(names: object, where: str) -> list[str]:
    from storage.errors import LabelValidationError
    from storage.labels import validate_name

    if not isinstance(names, list | tuple) or not names:
        raise BaseModelError(f"{where} names no classes (class_names is missing or empty)")
    try:
        checked = [validate_name(n) for n in names]
    except LabelValidationError as exc:
        raise BaseModelError(f"{where}: {exc}") from None
    dupes = sorted({n for n in checked if checked.count(n) > 1})
    if dupes:
        raise BaseModelError(f"{where}: class names repeat: {', '.join(dupes)}")
    return checked


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# Version 0 of a deployment


def resolve_base_model(value: str | Path | None) -> Path | None:
    """The worker's ``--base-model``: ``none`` (or empty) starts from an untrained network,
    ``default`` is the committed `DEFAULT_BASE_MODEL`, anything else a path."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "default":
        return DEFAULT_BASE_MODEL
    return Path(text)


def base_version0(
    path: Path, step: StepConfig, labels: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[int, np.ndarray]]:
    """Version 0 from the base model at ``path``: its payload, metadata and exemplar memory.

    The file must fit the deployment (``step``: backbone, channels and input geometry, which
    the worker trains posted images with). Its class names are registered in the label map
    ``labels`` first, in head order, so they take indices 0..k-1 and posted classes the next
    ones; a label map that already gives other indices is refused.
    """
    path = Path(path)
    tensors, metadata, exemplars = load_base(path)
    model = ModelConfig.model_validate(metadata["model"]["model_config"])
    augment = AugmentConfig.model_validate(metadata["augment"])
    wanted = step.model
    if (model.backbone, model.in_channels) != (wanted.backbone, wanted.in_channels):
        raise BaseModelError(
            f"the base model {path} is a {model.backbone} on {model.in_channels}-channel images; "
            f"the worker is configured for a {wanted.backbone} on {wanted.in_channels} "
            "(--backbone, --dataset)"
        )
    if augment != step.augment:
        diff = {
            k: (v, getattr(step.augment, k))
            for k, v in augment.model_dump().items()
            if v != getattr(step.augment, k)
        }
        raise BaseModelError(
            f"the base model {path} expects other inputs than the worker trains on "
            + "; ".join(f"{k}: base {a}, worker {b}" for k, (a, b) in diff.items())
            + " (--dataset)"
        )
    names = list(metadata["class_names"])
    indices = labels.get_or_add(names)
    if list(indices) != list(range(len(names))):
        known = labels.names()
        raise BaseModelError(
            f"the label map already holds other classes first ({', '.join(known[:10])}"
            f"{' ...' if len(known) > 10 else ''}): the base model's classes "
            f"({', '.join(names)}) need indices 0 to {len(names) - 1}. Start from an empty "
            "deployment (a fresh BSCE_PREFIX or data home) to use this base model"
        )
    metadata = {
        **metadata,
        "active_classes": [True] * len(names),
        "base_model": {
            **dict(metadata.get("base_model", {})),
            "file": str(path),
            "sha256": file_sha256(path),
        },
    }
    return tensors, metadata, exemplars


# --------------------------------------------------------------------------------------------
# train


def train_base(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from learner.data import load_dataset
    from learner.exemplars import ExemplarMemory
    from learner.step import StepData, train_step

    start = time.perf_counter()
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, root=args.data_root)
    names = _split_names(args.classes)
    _check_names(names, "--classes")
    available = list(dataset.train.class_names)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BaseModelError(
            f"{args.dataset} has no class {', '.join(unknown)}; it has {', '.join(available)}"
        )
    # Head order is the order of --classes, as the label map will number them.
    remap = torch.full((len(available),), -1, dtype=torch.int64)
    remap[torch.tensor([available.index(n) for n in names])] = torch.arange(len(names))
    train_y, test_y = remap[dataset.train.labels], remap[dataset.test.labels]
    idx = (train_y >= 0).nonzero().squeeze(1)
    if args.max_train_per_class is not None:
        idx = torch.cat(
            [idx[train_y[idx] == c][: args.max_train_per_class] for c in range(len(names))]
        )
    data = StepData(dataset.train.images[idx].clone(), train_y[idx].clone())
    test_idx = (test_y >= 0).nonzero().squeeze(1)

    augment = AugmentConfig(crop=dataset.crop, pad=dataset.pad, mean=dataset.mean, std=dataset.std)
    memory = (
        MemoryConfig(mode="fixed_per_class", size=args.exemplars_per_class, selection="herding")
        if args.exemplars_per_class > 0
        else MemoryConfig(mode="none", size=0)
    )
    config = StepConfig(
        model=ModelConfig(backbone=args.backbone, in_channels=dataset.train.images.shape[1]),
        optim=OptimConfig(epochs=args.epochs, min_steps=0, batch_size=args.batch_size, lr=args.lr),
        memory=memory,
        augment=augment,
    )
    # One stream from the seed: the weights first, then training (as learner.bench does);
    # the file keeps where it ended, so the first job on top continues it.
    generator = torch.Generator().manual_seed(args.seed)
    model = IncrementalNet.create(config.model, generator)
    print(
        f"training a {args.backbone} base on {len(names)} classes of {args.dataset} "
        f"({', '.join(names)}): {int(idx.numel())} images, {args.epochs} epochs, "
        f"{args.exemplars_per_class} exemplars per class, on {device}, "
        f"{torch.get_num_threads()} torch threads",
        file=sys.stderr,
        flush=True,
    )
    t_epoch = [time.perf_counter()]

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        now = time.perf_counter()
        print(
            f"epoch {epoch}/{epochs}: loss {loss:.4f} ({now - t_epoch[0]:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        t_epoch[0] = now

    result = train_step(
        model, data, ExemplarMemory(), config, device=device, generator=generator, on_epoch=on_epoch
    )
    net = result.model
    logits, feats = infer(
        net,
        dataset.test.images[test_idx],
        augment,
        device=device,
        batch_size=config.eval_batch_size,
    )
    y = test_y[test_idx]
    accuracy = _accuracy_per_class(logits.argmax(1), y, names)
    nme = None
    if result.class_means is not None:
        nme = _accuracy_per_class(nme_predict(feats, result.class_means), y, names)
    wall = time.perf_counter() - start
    extra = {
        "seed": args.seed,
        "rng": "seed",
        "active_classes": [True] * len(names),
        "base_model": {
            "source": "train",
            "command": command,
            "dataset": args.dataset,
            "data_source": dataset.source,
            "train_images": int(idx.numel()),
            "max_train_per_class": args.max_train_per_class,
            "test_images": int(test_idx.numel()),
            "test_accuracy": accuracy,
            "test_accuracy_nme": nme,
            "exemplars_per_class": args.exemplars_per_class,
            "wall_seconds": wall,
        },
        "report": result.report.model_dump(),
        "machine": describe_machine(device),
    }
    tensors, metadata = version_payload(
        net.cpu(),
        class_names=names,
        counts=result.counts.tolist(),
        augment=augment,
        class_means=result.class_means,
        config=config,
        generator=generator,
        extra=extra,
    )
    exemplars = {c: x.numpy() for c, x in result.memory.images.items()}
    out = write_base(Path(args.out), tensors, metadata, exemplars)
    summary = {
        "file": str(out),
        "bytes": out.stat().st_size,
        "test_accuracy": accuracy,
        "test_accuracy_nme": nme,
        "wall_seconds": wall,
        "train_seconds": result.report.train_seconds,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    _print_summary(summary, names)
    return summary


def _accuracy_per_class(pred: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> dict:
    per_class = {
        n: 100.0 * float((pred[y == i] == i).double().mean()) if bool((y == i).any()) else None
        for i, n in enumerate(names)
    }
    return {"top1": 100.0 * float((pred == y).double().mean()), "per_class": per_class}


def _print_summary(summary: Mapping[str, Any], names: Sequence[str]) -> None:
    acc = summary["test_accuracy"]
    nme = summary.get("test_accuracy_nme")
    print(f"wrote {summary['file']} ({summary['bytes']:,} bytes)")
    print(f"{'class':<14} {'CNN':>7}" + (f" {'NME':>7}" if nme else ""))
    for n in names:
        row = f"{n:<14} {_pct(acc['per_class'][n]):>7}"
        if nme:
            row += f" {_pct(nme['per_class'][n]):>7}"
        print(row)
    print(f"{'all':<14} {_pct(acc['top1']):>7}" + (f" {_pct(nme['top1']):>7}" if nme else ""))
    print(
        f"wall {summary['wall_seconds']:.0f} s (training {summary['train_seconds']:.0f} s) on "
        f"{summary['device']}, CPU capability {summary['cpu_capability']}"
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


# --------------------------------------------------------------------------------------------
# import


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors file or a ``torch.save`` file, the latter through
    ``torch.load(weights_only=True)`` only: a pickle that needs anything beyond tensors and
    plain containers is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"no checkpoint at {path}")
    if _looks_like_safetensors(path):
        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BaseModelError(f"{path}: unreadable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
            raise BaseModelError(
                f"{path} is neither a safetensors file nor a plain torch state dict that "
                "torch.load(weights_only=True) accepts (arbitrary pickles are refused, not "
                f"run): {_short(exc, 300)}"
            ) from None
    # Training scripts often wrap the weights: {"state_dict": ...}, {"model": ...}.
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise BaseModelError(f"{path} holds no state dict (a mapping of names to tensors)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BaseModelError(
            f"{path}: not a state dict; entries that are not tensors: {', '.join(map(str, bad[:5]))}"
        )
    out = dict(state)
    for prefix in ("module.", _MODEL_PREFIX):  # DataParallel; a version payload
        if all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (100 << 20) and head[8:9] == b"{"


def to_incremental_state(state: Mapping[str, torch.Tensor], backbone: str) -> dict:
    """``IncrementalNet`` keys (``backbone.*``, ``head.*``) from its own state dict or from a
    torchvision ResNet's (``conv1.*`` ... ``fc.*``, the classifier becoming the head)."""
    if "head.weight" in state:
        out = dict(state)
    elif "fc.weight" in state:
        if backbone != "resnet18":
            raise BaseModelError(
                f"this is a torchvision ResNet checkpoint (fc.weight); import it with "
                f"--backbone resnet18, not {backbone}"
            )
        out = {
            ("head." + k[3:] if k.startswith("fc.") else "backbone." + k): v
            for k, v in state.items()
        }
    else:
        sample = ", ".join(list(state)[:6])
        raise BaseModelError(
            "the checkpoint has no classifier head: expected IncrementalNet keys (head.weight) "
            f"or a torchvision ResNet's (fc.weight); its first keys are {sample}"
        )
    if "head.bias" not in out:
        raise BaseModelError("the checkpoint's classifier has no bias (head.bias / fc.bias)")
    return out


def import_base(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from learner.data import augment_for

    start = time.perf_counter()
    device = resolve_device(args.device)
    names = _check_names(_split_names(args.class_names), "--class-names")
    dataset = args.dataset or ("imagenet" if args.backbone == "resnet18" else "cifar10")
    augment = augment_for(dataset)
    state = to_incremental_state(read_checkpoint(args.checkpoint), args.backbone)
    rows = int(state["head.weight"].shape[0])
    if rows != len(names):
        raise BaseModelError(
            f"the checkpoint's head has {rows} rows (classes) but {len(names)} class names "
            f"were given ({', '.join(names)}); give one name per row, in row order"
        )
    config = ModelConfig(backbone=args.backbone, in_channels=len(augment.mean))
    net = IncrementalNet(config, rows)
    # Checkpoints written without BatchNorm's step counters still load: it is not a weight.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BaseModelError(
            f"the checkpoint does not fit a {args.backbone} IncrementalNet: {_short(exc)}"
        ) from None
    net.eval()

    exemplars: dict[int, np.ndarray] = {}
    class_means = None
    if args.exemplars is not None:
        exemplars, class_means = _exemplars_from_tree(
            Path(args.exemplars), names, net, augment, device, args.exemplars_per_class
        )
    generator = torch.Generator().manual_seed(args.seed)
    tensors, metadata = version_payload(
        net.cpu(),
        class_names=names,
        # What the checkpoint was trained on is not known: 0 per class, and the first job
        # recounts (the log-prior is always recomputed from the step's own training set).
        counts=[0] * rows,
        augment=augment,
        class_means=class_means,
        generator=generator,
        extra={
            "seed": args.seed,
            "rng": "seed",
            "active_classes": [True] * rows,
            "base_model": {
                "source": "import",
                "command": command,
                "checkpoint": str(args.checkpoint),
                "checkpoint_sha256": file_sha256(Path(args.checkpoint)),
                "dataset_geometry": dataset,
                "exemplars_per_class": {names[c]: int(x.shape[0]) for c, x in exemplars.items()},
                "test_accuracy": None,
            },
        },
    )
    out = write_base(Path(args.out), tensors, metadata, exemplars)
    summary = {
        "file": str(out),
        "bytes": out.stat().st_size,
        "classes": names,
        "exemplars": {names[c]: int(x.shape[0]) for c, x in exemplars.items()},
        "wall_seconds": time.perf_counter() - start,
    }
    print(
        f"wrote {out} ({summary['bytes']:,} bytes): {args.backbone}, {rows} classes, "
        f"{sum(summary['exemplars'].values())} exemplars"
    )
    return summary


def _exemplars_from_tree(
    root: Path,
    names: Sequence[str],
    net: IncrementalNet,
    augment: AugmentConfig,
    device: torch.device,
    per_class: int | None,
) -> tuple[dict[int, np.ndarray], torch.Tensor]:
    """``root/<class>/*`` decoded to the network's input size, ordered by herding on the
    imported network's features (best first), capped at ``per_class``."""
    from learner.exemplars import herding

    if not root.is_dir():
        raise BaseModelError(f"--exemplars {root} is not a directory")
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    strays = sorted(set(folders) - set(names))
    if strays:
        raise BaseModelError(
            f"--exemplars {root} has folders for classes the model does not have: "
            f"{', '.join(strays)} (classes: {', '.join(names)})"
        )
    channels = net.config.in_channels
    out: dict[int, np.ndarray] = {}
    means = torch.full((len(names), net.feature_dim), float("nan"))
    for c, name in enumerate(names):
        if name not in folders:
            continue
        files = sorted(
            p
            for p in folders[name].iterdir()
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not files:
            raise BaseModelError(f"--exemplars {folders[name]} holds no images")
        images = []
        for p in files:
            try:
                images.append(decode_image(p.read_bytes(), size=augment.crop, channels=channels))
            except ValueError as exc:
                raise BaseModelError(f"exemplar {p}: {exc}") from None
        x = torch.from_numpy(np.stack(images))
        _, feats = infer(net, x, augment, device=device)
        order = herding(feats, per_class if per_class else x.shape[0])
        out[c] = x[order].numpy()
        means[c] = class_means_from_features(feats[order])
    return out, means


# --------------------------------------------------------------------------------------------
# command line


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m learner.base",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a base model with the learner's train_step")
    t.add_argument("--dataset", default="cifar10", help="a learner.data data set name")
    t.add_argument("--data-root", type=Path, default=None)
    t.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        help="comma-separated class names, in head order",
    )
    t.add_argument("--backbone", choices=["resnet32", "resnet18", "resnet8"], default="resnet32")
    t.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument(
        "--exemplars-per-class",
        type=int,
        default=DEFAULT_EXEMPLARS_PER_CLASS,
        help="exemplars kept per class, chosen by herding (0: none)",
    )
    t.add_argument(
        "--max-train-per-class",
        type=int,
        default=None,
        help="cap training images per class (quick runs); test images are not capped",
    )
    t.add_argument("--seed", type=int, default=1993)
    t.add_argument("--out", type=Path, default=DEFAULT_BASE_MODEL)

    i = sub.add_parser("import", help="turn a checkpoint into a base model")
    i.add_argument("--checkpoint", type=Path, required=True)
    i.add_argument("--class-names", required=True, help="comma-separated, in head-row order")
    i.add_argument("--backbone", choices=["resnet32", "resnet18", "resnet8"], default="resnet32")
    i.add_argument(
        "--dataset",
        default=None,
        help="input geometry and normalisation (default: imagenet for resnet18, else cifar10)",
    )
    i.add_argument("--exemplars", type=Path, default=None, help="DIR/<class>/*.png|jpg")
    i.add_argument(
        "--exemplars-per-class",
        type=int,
        default=None,
        help="keep at most this many per class, in herding order (default: all)",
    )
    i.add_argument("--seed", type=int, default=1993, help="seed of the random stream jobs continue")
    i.add_argument("--out", type=Path, required=True)

    for s in (t, i):
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m learner.base " + shlex.join(argv)
    try:
        if args.command == "train":
            if args.epochs < 1 or args.exemplars_per_class < 0:
                raise BaseModelError("--epochs must be at least 1, --exemplars-per-class >= 0")
            if args.max_train_per_class is not None and args.max_train_per_class < 1:
                raise BaseModelError("--max-train-per-class must be at least 1")
            return train_base(args, command)
        if args.exemplars_per_class is not None and args.exemplars_per_class < 1:
            raise BaseModelError("--exemplars-per-class must be at least 1")
        return import_base(args, command)
    except BaseModelError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
