"""learner.compare: which methods run, a tiny comparison on the bundled subset, resuming (and
learner.bench's own --resume)."""

import json

import pytest
import torch

from learner import bench, compare
from learner.core.methods import METHOD_NAMES
from learner.methods import get_method

# Five steps of two classes, 10 training images a class, one epoch: seconds per method.
_TINY = [
    "--protocol",
    "cifar10-subset-b0-s5",
    "--backbone",
    "resnet8",
    "--epochs",
    "1",
    "--min-steps",
    "0",
    "--max-train-per-class",
    "10",
    "--device",
    "cpu",
    "--no-progress",
    # Tiny steps: one thread is as fast as two on an idle machine and much faster on a busy one.
    "--threads",
    "1",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's process-wide count; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_methods_that_apply_to_the_memory_setting():
    with_memory = compare.applicable_methods(2000)
    without = compare.applicable_methods(0)
    assert {"bsce", "ce", "finetune", "wa"} <= set(with_memory) & set(without)
    assert "lwf" in without and "lwf" not in with_memory
    for name in METHOD_NAMES:
        if get_method(name).memory == "required":
            assert name in with_memory and name not in without
    # Asked for by name, LwF runs with a memory too; a method that needs one never without.
    assert compare.parse_methods("lwf,bsce", 2000) == ["lwf", "bsce"]
    with pytest.raises(SystemExit, match="need"):
        compare.parse_methods("icarl", 0)
    with pytest.raises(SystemExit, match="unknown"):
        compare.parse_methods("podnet", 0)


def test_a_tiny_comparison_writes_results_table_and_plot(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    argv = [*_TINY, "--memory", "40", "--methods", "bsce,icarl,bic", "--out", str(out)]
    md, png = compare.main(argv)
    runs = sorted(out.glob("*_seed1993_cpu.json"))
    assert [json.loads(p.read_text())["method"] for p in runs] == ["bic", "bsce", "icarl"]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    table = md.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["bsce", "icarl", "bic"]
    assert "| icarl | nme |" in table and "| bic | cnn |" in table
    icarl = json.loads(next(p for p in runs if "_icarl_" in p.name).read_text())
    assert icarl["classifier"] == "nme"
    figures = compare.run_figures(icarl)
    assert figures["avg"] == icarl["nme"]["avg_incremental_accuracy"]
    bic = json.loads(next(p for p in runs if "_bic_" in p.name).read_text())
    assert compare.run_figures(bic)["stage_seconds"] > 0

    # Resumable: a second invocation trains nothing and rebuilds the table from the files.
    def no_training(*args, **kwargs):
        raise AssertionError("a run whose result exists was trained again")

    monkeypatch.setattr(bench, "run_protocol", no_training)
    before = {p: p.stat().st_mtime_ns for p in runs}
    assert compare.main(argv) == (md, png)
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    # Another budget into the same folder is refused, not mixed in.
    with pytest.raises(SystemExit, match="another recipe"):
        compare.main([*argv, "--lr", "0.05"])


def test_methods_are_also_compared_on_the_orders_they_share():
    def run(method, order, seed=1993):
        return {"method": method, "order_name": order, "seed": seed}

    results = [
        run("bsce", "seed1993-permutation"),
        run("bsce", "seed1994-permutation"),
        run("ce", "seed1993-permutation"),
        run("ce", "seed1993-permutation", seed=7),
        run("wa", "seed1993-permutation"),
    ]
    paired, pairs = compare.paired_runs(results)
    assert pairs == ["seed1993-permutation seed 1993"]
    assert [r["method"] for r in paired] == ["bsce", "ce", "wa"]


def test_a_bench_series_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    """``learner.bench --resume``: a series over orders cut short (here: the second order's
    file is gone) trains only what is missing, keeps the finished file untouched, and its
    summary covers every run."""
    out = tmp_path / "series"
    argv = [*_TINY, "--memory", "40", "--orders", "2", "--out", str(out), "--resume"]
    first = bench.main(argv)
    runs = sorted(out.glob("*_cpu.json"))
    assert len(runs) == 2
    missing = next(p for p in runs if "_order-" in p.name)
    finished = next(p for p in runs if p != missing)
    missing.unlink()
    mtime = finished.stat().st_mtime_ns

    trained = []
    run_protocol = bench.run_protocol

    def counting(*args, **kwargs):
        trained.append(args[3])
        return run_protocol(*args, **kwargs)

    monkeypatch.setattr(bench, "run_protocol", counting)
    again = bench.main(argv)
    assert trained == [first[1]["class_order"]]
    assert finished.stat().st_mtime_ns == mtime and missing.exists()
    assert again[0] == json.loads(json.dumps(first[0]))
    # Same seed, same order: the rerun of the missing order is the same run.
    assert again[1]["cnn"]["accuracy_matrix"] == first[1]["cnn"]["accuracy_matrix"]
    summary = json.loads(next(out.glob("*_summary.json")).read_text())
    assert len(summary["runs"]) == 2
    # A file of another recipe under the same name is refused, not kept.
    with pytest.raises(SystemExit, match="another recipe"):
        bench.main([*argv, "--lr", "0.05"])
