"""The GPU path without a GPU: the precision knob on CPU, the server's model-memory accounting,
and the CPU fallback of scripts/gpu_check.py end to end (issue 13)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from learner.cli import add_recipe_arguments, recipe_from_args
from learner.core.config import MemoryConfig, ModelConfig, OptimConfig, StepConfig
from learner.core.machine import autocast, precision_name, resolve_precision
from learner.core.model import IncrementalNet
from learner.exemplars import ExemplarMemory
from learner.step import StepData, train_step
from server.holder import ModelHolder, inference_dtype, model_bytes
from server.metrics import Metrics
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# -- the precision knob ----------------------------------------------------------------------


def test_precision_resolves_to_fp32_on_cpu_unless_bf16_is_asked() -> None:
    assert OptimConfig().precision == "auto"
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert precision_name(None) == "fp32" and precision_name(torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)
    # The server: bf16 autocast on CUDA only; CPU inference stays fp32 whatever is asked.
    assert inference_dtype("bf16", CPU) is None and inference_dtype("auto", CPU) is None
    with autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_precision_flag_and_setting() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_recipe_arguments(p)
    config = recipe_from_args(p.parse_args(["--precision", "bf16"]), StepConfig())
    assert config.optim.precision == "bf16"
    assert recipe_from_args(p.parse_args([]), StepConfig()).optim.precision == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp16"])
    assert Settings.from_env({}).precision == "auto"
    assert Settings.from_env({"BSCE_PRECISION": "fp32"}).precision == "fp32"
    with pytest.raises(ValueError, match="BSCE_PRECISION"):
        Settings.from_env({"BSCE_PRECISION": "half"})


def _tiny_step(precision: str | None):
    """Two steps (the second distils) of ResNet-8 on random images; ``None``: the config
    without the field given at all (its default)."""
    optim = {"epochs": 1, "min_steps": 0, "batch_size": 16}
    if precision is not None:
        optim["precision"] = precision
    config = StepConfig(
        model=ModelConfig(backbone="resnet8"),
        optim=OptimConfig(**optim),
        memory=MemoryConfig(mode="fixed_per_class", size=4),
    )
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8)
    model = IncrementalNet.create(config.model, g)
    first = train_step(
        model,
        StepData(images[:24], torch.arange(24) % 2),
        ExemplarMemory(),
        config,
        device=CPU,
        generator=g,
    )
    return train_step(
        first.model,
        StepData(images[24:], torch.arange(24) % 2 + 2),
        first.memory,
        config,
        device=CPU,
        generator=g,
    )


def test_fp32_and_auto_train_bit_identically_on_cpu() -> None:
    runs = [_tiny_step(p) for p in (None, "auto", "fp32")]
    states = [r.model.state_dict() for r in runs]
    for s in states[1:]:
        assert all(torch.equal(states[0][k], s[k]) for k in states[0])
    losses = [r.report.loss_per_epoch for r in runs]
    assert losses[0] == losses[1] == losses[2]
    assert all(v.dtype == torch.float32 for v in states[0].values() if v.is_floating_point())


def test_bf16_autocast_on_cpu_still_trains() -> None:
    bf16, fp32 = _tiny_step("bf16"), _tiny_step("fp32")
    assert all(math.isfinite(v) for v in bf16.report.loss_per_epoch)
    state = bf16.model.state_dict()
    # Weights stay fp32 (autocast changes the arithmetic, not the parameters) ...
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # ... and the arithmetic did change: the path ran in bf16.
    ref = fp32.model.state_dict()
    assert not all(torch.equal(state[k], ref[k]) for k in state)
    assert bf16.model.num_classes == 4 and bf16.memory.counts() == {c: 4 for c in range(4)}


# -- the server's model memory ---------------------------------------------------------------


def test_model_bytes_counts_parameters_and_buffers() -> None:
    net = IncrementalNet.create(ModelConfig(backbone="resnet8"), torch.Generator(), 3)
    expected = sum(t.numel() * 4 for t in net.parameters())
    expected += sum(t.numel() * t.element_size() for t in net.buffers())
    assert model_bytes(net) == expected > 0


class _Served:
    def __init__(self, version: int, nbytes: int) -> None:
        self.version = version
        self.model_bytes = nbytes
        self.device = CPU
        self.amp = None


def test_holder_counts_both_versions_during_a_swap() -> None:
    metrics = Metrics()
    holder = ModelHolder(lambda v: _Served(v, 1000), metrics)  # type: ignore[arg-type,return-value]
    empty = holder.memory()
    assert empty["served_bytes"] == 0 and empty["served_version"] is None
    assert holder.swap_to(1)
    assert holder.memory()["served_bytes"] == 1000 and holder.swap_peak_bytes == 1000

    resident, release = threading.Event(), threading.Event()

    def loader(v: int) -> _Served:
        holder.loading_resident(v, 3000)  # the weights are on the device, warm-up follows
        resident.set()
        release.wait(5)
        return _Served(v, 3000)

    holder._loader = loader  # type: ignore[assignment]
    swapper = threading.Thread(target=holder.swap_to, args=(2,))
    swapper.start()
    assert resident.wait(5)
    during = holder.memory()
    assert (during["served_version"], during["served_bytes"]) == (1, 1000)
    assert (during["loading_version"], during["loading_bytes"]) == (2, 3000)
    assert 'bsce_model_bytes{slot="loading"} 3000.0' in metrics.text()
    release.set()
    swapper.join(5)
    after = holder.memory()
    assert (after["served_version"], after["served_bytes"]) == (2, 3000)
    assert after["loading_version"] is None and after["loading_bytes"] == 0
    assert after["swap_peak_bytes"] == 4000  # both versions were resident at the switch
    assert after["cuda_allocated_bytes"] is None and after["precision"] == "fp32"
    text = metrics.text()
    assert 'bsce_model_bytes{slot="served"} 3000.0' in text
    assert 'bsce_model_bytes{slot="loading"} 0.0' in text

    def broken(v: int) -> _Served:
        raise OSError("no such version")

    holder._loader = broken  # type: ignore[assignment]
    assert not holder.swap_to(3)
    assert holder.memory()["loading_bytes"] == 0 and holder.current.version == 2


# -- the script's CPU fallback, end to end -------------------------------------------------


@pytest.mark.integration
def test_gpu_check_cpu_fallback_writes_its_figures(tmp_path: Path) -> None:
    """Starts an embedded Redis, a learner worker and `bentoml serve` (about 1-2 minutes on
    2 cores, most of it starting the server)."""
    start = time.monotonic()
    proc = subprocess.run(
        # No time budget: how fast this machine runs the checks is not what the test checks
        # (the subprocess timeout only bounds a hang).
        [
            sys.executable,
            "scripts/gpu_check.py",
            "--device",
            "cpu",
            "--budget-s",
            "100000",
            "--out-dir",
            str(tmp_path),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("gpu_check_cpu_*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    r = json.loads(files[0].read_text())
    assert r["format"] == "bsce-serve/gpu-check-1" and r["errors"] == {}
    assert r["device"] == "cpu" and r["gpu"] is None and r["sizes"] == "quick"
    assert r["precision"] == "fp32" and r["precision_setting"] == "auto"
    assert r["torch"] == torch.__version__
    assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert r["wall_seconds"] <= time.monotonic() - start

    s = r["speed"]
    assert s["precision"] == "fp32" and s["device"] == "cpu"
    assert s["learner_images_per_second"] > 0 and s["bare_images_per_second"] > 0
    assert s["ratio"] == pytest.approx(s["learner_images_per_second"] / s["bare_images_per_second"])

    p = r["protocol"]
    assert p["protocol"] == "cifar10-subset-b0-s5" and p["precision_setting"] == "auto"
    assert len(p["accuracy_per_step"]) == len(p["new_accuracy_per_step"]) == 5
    assert p["old_accuracy_per_step"][0] is None
    assert all(0 <= a <= 100 for a in p["old_accuracy_per_step"][1:])
    assert all(0 <= a <= 100 for a in p["accuracy_per_step"] + p["new_accuracy_per_step"])
    assert list(Path(p["result_dir"]).glob("cifar10-subset-b0-s5_*.json"))

    v = r["serve"]
    assert v["http"]["images_per_second"] > 0 and v["http"]["failed"] == 0
    assert v["bare"]["images_per_second"] > 0 and v["http_over_bare"] > 0
    assert v["single"]["ok"] == v["single"]["requests"] and v["single"]["p50_ms"] > 0
    (mem,) = v["model_memory"]  # one API worker in the quick sizes
    assert mem["served_version"] == v["learned_version"] >= 1
    assert mem["served_bytes"] == v["bare"]["model_bytes"] > 0
    # At the last switch the worker held two versions (the one before may be the job's
    # interim version, of the same size).
    before = v["model_memory_before_swap"]["served_bytes"]
    assert mem["swap_peak_bytes"] >= mem["served_bytes"] + min(before, mem["served_bytes"])
    assert mem["swap_peak_bytes"] <= 2 * mem["served_bytes"]
    assert mem["cuda_allocated_bytes"] is None and mem["precision"] == "fp32"
    assert any('slot="served"' in line for line in v["metrics_lines"])
