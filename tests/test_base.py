"""Base models (learner.base): version 0 from a trained network, imported or trained here."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from learner.base import (
    BASE_FORMAT,
    DEFAULT_BASE_MODEL,
    DEFAULT_CLASSES,
    DEFAULT_EPOCHS,
    DEFAULT_EXEMPLARS_PER_CLASS,
    BaseModelError,
    base_version0,
    load_base,
    main,
)
from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.evaluate import infer
from learner.core.gate import GateConfig
from learner.core.model import IncrementalNet
from learner.core.versioning import load_version
from learner.data import load_dataset
from learner.worker import Worker, WorkerConfig
from storage import LabelMap, Storage
from tests.test_storage_support import drop_prefix

CPU = torch.device("cpu")
NAMES = ["airplane", "automobile", "bird"]


@pytest.fixture(scope="module")
def subset():
    return load_dataset("cifar10-subset")


@pytest.fixture
def base_storage(machine_redis, tmp_path: Path) -> Iterator[Storage]:
    """A deployment of the test's own: a key prefix on the test Redis, a model store."""
    prefix = f"bsce-test-base-{uuid.uuid4().hex[:10]}"
    yield Storage(machine_redis, prefix, bentoml_home=tmp_path / "bentoml")
    drop_prefix(machine_redis, prefix)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared CPU) on one thread; `main
    --threads 1` sets it for the process too, so put the count back after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _class_images(subset, name: str, n: int, split: str = "train") -> torch.Tensor:
    part = getattr(subset, split)
    c = part.class_names.index(name)
    return part.images[(part.labels == c).nonzero().squeeze(1)[:n]]


def _net(classes: int, seed: int = 0) -> IncrementalNet:
    return IncrementalNet.create(
        ModelConfig(backbone="resnet8"), torch.Generator().manual_seed(seed), classes
    ).eval()


def _exemplar_tree(root: Path, subset, per_class: dict[str, int]) -> Path:
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i, x in enumerate(_class_images(subset, name, n)):
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / name / f"{i:03d}.png")
    return root


def _worker_config(base: Path | None, backbone: str = "resnet8") -> WorkerConfig:
    step = StepConfig(
        model=ModelConfig(backbone=backbone),
        optim=OptimConfig(epochs=1, min_steps=0, batch_size=32),
        memory=MemoryConfig(mode="fixed_total", size=40),
    )
    # Gate off: the test counts what the step trains on (tests/test_gate_worker.py has the gate).
    return WorkerConfig(
        step=step,
        seed=5,
        claim_timeout_s=2.0,
        poll_ms=100,
        base_model=base,
        gate=GateConfig(enabled=False),
        fast_path=False,  # the test counts versions (tests/test_fast_path.py has interims)
    )


def _rows(x: np.ndarray) -> list[bytes]:
    return sorted(img.tobytes() for img in x)


@pytest.mark.integration
def test_imported_model_is_version_0_with_the_same_predictions(tmp_path, subset, base_storage):
    storage = base_storage
    net = _net(len(NAMES))
    checkpoint = tmp_path / "net.safetensors"
    save_file(net.to_tensors(), str(checkpoint))
    per_class = {"airplane": 6, "automobile": 4}  # bird: no exemplars
    tree = _exemplar_tree(tmp_path / "exemplars", subset, per_class)
    out = tmp_path / "base.safetensors"
    main(
        ["import", "--checkpoint", str(checkpoint), "--class-names", ",".join(NAMES)]
        + ["--backbone", "resnet8", "--exemplars", str(tree), "--out", str(out)]
    )

    _, metadata, exemplars = load_base(out)
    assert metadata["class_names"] == NAMES
    assert set(exemplars) == {NAMES.index(n) for n in per_class}
    for name, n in per_class.items():
        # Every image of the folder, decoded to the same pixels, reordered by herding.
        want = _class_images(subset, name, n).numpy()
        assert _rows(exemplars[NAMES.index(name)]) == _rows(want)

    worker = Worker(storage, _worker_config(out), CPU, consumer="w")
    worker.ensure_initial_version()
    assert storage.versions.current() == 0
    assert storage.labels.names() == NAMES
    tensors, meta = storage.versions.load(0)
    version0 = load_version(tensors, meta)
    assert version0.class_names == tuple(NAMES)
    assert meta["base_model"]["file"] == str(out)
    # The file's exemplars are version 0's memory (generation 0), in their herding order.
    memory0 = storage.exemplars.read(0)
    assert memory0.keys() == exemplars.keys()
    assert all(np.array_equal(memory0[c], exemplars[c]) for c in exemplars)

    test = subset.test.images[:120]
    before, _ = infer(net, test, version0.augment, device=CPU)
    after, _ = infer(version0.model, test, version0.augment, device=CPU)
    assert torch.equal(before.argmax(1), after.argmax(1))
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    # A posted class takes the next index, and the step trains on version 0's exemplars.
    posted = _class_images(subset, "cat", 12).numpy()
    job = storage.jobs.submit(posted, ["cat"] * len(posted))
    assert worker.run(once=True) == 1
    assert storage.jobs.status(job).version == 1
    _, meta1 = storage.versions.load(1)
    assert meta1["class_names"] == [*NAMES, "cat"]
    assert meta1["counts"] == [per_class.get(n, 0) for n in NAMES] + [len(posted)]

    # A restart finds version 0 and leaves it alone.
    Worker(storage, _worker_config(out), CPU, consumer="w2").ensure_initial_version()
    assert [v.version for v in storage.versions.list()] == [0, 1]


def test_torchvision_resnet18_checkpoint_imports(tmp_path):
    tv = torchvision.models.resnet18(num_classes=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that they must load
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    checkpoint = tmp_path / "resnet18.pth"
    # As DataParallel training scripts save it: wrapped, with "module." in front.
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, checkpoint)
    out = tmp_path / "base.safetensors"
    names = ["w", "x", "y", "z"]
    main(
        ["import", "--checkpoint", str(checkpoint), "--class-names", ",".join(names)]
        + ["--backbone", "resnet18", "--out", str(out)]
    )

    tensors, metadata, exemplars = load_base(out)
    loaded = load_version(tensors, metadata)
    assert loaded.class_names == tuple(names) and exemplars == {}
    assert loaded.image_shape == (3, 224, 224)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tv(x))


class _Payload:
    """Unpickling this would create a file: a checkpoint must never be unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_not_run(tmp_path):
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 512)}, "x": _Payload(marker)}, pickled)
    with pytest.raises(SystemExit, match="weights_only"):
        main(
            ["import", "--checkpoint", str(pickled), "--class-names", "a,b"]
            + ["--backbone", "resnet18", "--out", str(tmp_path / "out.safetensors")]
        )
    with pytest.raises(BaseModelError, match="not a safetensors file"):
        load_base(pickled)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_checkpoints_and_names_are_refused(tmp_path):
    checkpoint = tmp_path / "net.safetensors"
    save_file(_net(3).to_tensors(), str(checkpoint))

    def run(names: str, *extra: str) -> None:
        main(["import", "--checkpoint", str(checkpoint), "--class-names", names, "--backbone"]
             + ["resnet8", "--out", str(tmp_path / "out.safetensors"), *extra])  # fmt: skip

    with pytest.raises(SystemExit, match=r"head has 3 rows .* but 2 class names"):
        run("a,b")
    with pytest.raises(SystemExit, match="names no classes"):
        run(" , ")
    with pytest.raises(SystemExit, match="repeat: a"):
        run("a,b,a")
    with pytest.raises(SystemExit, match="does not fit a resnet32"):
        main(
            ["import", "--checkpoint", str(checkpoint), "--class-names", "a,b,c"]
            + ["--out", str(tmp_path / "out.safetensors")]
        )
    (tmp_path / "ex" / "d").mkdir(parents=True)
    with pytest.raises(SystemExit, match="classes the model does not have: d"):
        run("a,b,c", "--exemplars", str(tmp_path / "ex"))
    assert not (tmp_path / "out.safetensors").exists()


def _forged(path: Path, metadata: dict, exemplars: dict[str, torch.Tensor] | None = None) -> Path:
    """A base-model file written past `write_base`'s checks."""
    net = _net(3)
    tensors = {f"model.{k}": v for k, v in net.to_tensors().items()}
    save_file(
        {**tensors, **(exemplars or {})},
        str(path),
        metadata={"format": BASE_FORMAT, "version": json.dumps(metadata)},
    )
    return path


def _good_metadata() -> dict:
    from learner.core.versioning import version_payload

    net = _net(3)
    _, metadata = version_payload(
        net, class_names=NAMES, counts=[0, 0, 0], augment=StepConfig().augment
    )
    return metadata


def test_bad_base_files_are_refused_with_clear_errors(tmp_path):
    good = _good_metadata()
    load_base(_forged(tmp_path / "ok.safetensors", good))  # the forgery itself is sound

    cases = {
        "names 2 classes": {**good, "class_names": NAMES[:2]},
        "names no classes": {k: v for k, v in good.items() if k != "class_names"},
    }
    for message, metadata in cases.items():
        path = _forged(tmp_path / "bad.safetensors", metadata)
        with pytest.raises(BaseModelError, match=message):
            load_base(path)
    wrong_shape = {"exemplars.1": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}
    with pytest.raises(BaseModelError, match=r"class 1 \(automobile\) must be uint8"):
        load_base(_forged(tmp_path / "bad.safetensors", good, wrong_shape))
    float_images = {"exemplars.0": torch.zeros(2, 3, 32, 32)}
    with pytest.raises(BaseModelError, match="must be uint8"):
        load_base(_forged(tmp_path / "bad.safetensors", good, float_images))
    no_class = {"exemplars.3": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}
    with pytest.raises(BaseModelError, match="names no class of the head"):
        load_base(_forged(tmp_path / "bad.safetensors", good, no_class))

    plain = tmp_path / "plain.safetensors"
    save_file(_net(3).to_tensors(), str(plain))
    with pytest.raises(BaseModelError, match="not a base model"):
        load_base(plain)
    with pytest.raises(BaseModelError, match="no base-model file"):
        load_base(tmp_path / "missing.safetensors")


@pytest.mark.integration
def test_version0_refuses_a_base_that_does_not_fit(tmp_path, base_storage):
    storage = base_storage
    base = _forged(tmp_path / "base.safetensors", _good_metadata())
    with pytest.raises(BaseModelError, match="worker is configured for a resnet32"):
        base_version0(base, _worker_config(None, "resnet32").step, storage.labels)
    assert storage.labels.names() == []

    labels: LabelMap = storage.labels
    labels.get_or_add(["ship"])  # a class posted before version 0 existed
    with pytest.raises(BaseModelError, match="label map already holds other classes"):
        base_version0(base, _worker_config(None).step, labels)


def test_train_writes_a_loadable_base_model(tmp_path, subset):
    out = tmp_path / "trained.safetensors"
    names, per_class = ["cat", "dog", "airplane"], 4
    train = ["train", "--dataset", "cifar10-subset", "--classes", ",".join(names)] + [
        "--backbone", "resnet8", "--epochs", "2", "--batch-size", "16",
        "--max-train-per-class", "24", "--exemplars-per-class", str(per_class),
        "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    summary = main([*train, "--out", str(out)])

    tensors, metadata, exemplars = load_base(out)
    assert summary["file"] == str(out) and summary["bytes"] == out.stat().st_size
    assert metadata["class_names"] == names
    assert metadata["config"]["model"]["backbone"] == "resnet8"
    assert metadata["seed"] == 1993 and "rng.state" in tensors
    info = metadata["base_model"]
    assert info["source"] == "train" and info["command"].startswith("python -m learner.base train")
    assert set(info["test_accuracy"]["per_class"]) == set(names)
    assert info["test_images"] == sum(len(_class_images(subset, n, 10**6, "test")) for n in names)
    # Exemplars: per_class training images of each class, by herding.
    for c, name in enumerate(names):
        assert exemplars[c].shape == (per_class, 3, 32, 32)
        pool = set(_rows(_class_images(subset, name, 24).numpy()))
        assert set(_rows(exemplars[c])) <= pool
    loaded = load_version(tensors, metadata)
    assert loaded.class_means is not None and loaded.class_means.shape[0] == len(names)

    # The same command and seed give the same file contents (one explicit generator).
    again = tmp_path / "again.safetensors"
    main([*train, "--out", str(again)])
    tensors2, _, exemplars2 = load_base(again)
    assert tensors2.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert all(np.array_equal(exemplars[c], exemplars2[c]) for c in exemplars)


def test_the_committed_base_model_is_what_its_defaults_make():
    """models/base-cifar10-animals.safetensors loads and is what `python -m learner.base
    train` writes with its defaults (models/README.md)."""
    tensors, metadata, exemplars = load_base(DEFAULT_BASE_MODEL)
    assert metadata["class_names"] == list(DEFAULT_CLASSES)
    assert metadata["config"]["optim"]["epochs"] == DEFAULT_EPOCHS
    assert metadata["config"]["model"]["backbone"] == "resnet32"
    assert set(exemplars) == set(range(len(DEFAULT_CLASSES)))
    assert all(x.shape[0] == DEFAULT_EXEMPLARS_PER_CLASS for x in exemplars.values())
    assert metadata["base_model"]["command"].startswith("python -m learner.base train")
    assert "rng.state" in tensors
