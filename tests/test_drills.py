"""The fault-drill script (``python -m loadtest.drills``): its reporting, and one cheap drill
end to end through the same code as the full run (its own redis-server, learner worker and
``bentoml serve``; Redis stopped while the worker is idle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import drills


def test_mid_step_jobs_are_sized_from_the_measured_step_within_bounds() -> None:
    assert drills.Sizing(0.1, 20.0).overrides() == {"min_steps": 200}
    assert drills.Sizing(10.0, 20.0).overrides() == {"min_steps": 50}  # still several epochs
    assert drills.Sizing(0.0, 20.0).overrides() == {"min_steps": 15_000}  # under the job limit


def test_the_table_escapes_cell_pipes_and_shows_the_verdict() -> None:
    rows = [drills.Row(1, "d", "a | b", "seen", True, 1.0), drills.Row(2, "e", "x", "y", False, 2)]
    table = drills.format_table(rows).splitlines()
    assert table[2] == "| 1 | d | a \\| b | seen | PASS |"
    assert table[3].endswith("| FAIL |")


def test_wait_for_returns_a_falsy_value_other_than_none_and_false() -> None:
    assert drills.wait_for(lambda: 0, 1, "zero") == 0
    with pytest.raises(drills.DrillFailed, match="timed out after 0 s waiting for never"):
        drills.wait_for(lambda: None, 0, "never", poll_s=0)


@pytest.mark.integration
def test_the_redis_idle_drill_passes_and_is_written(tmp_path: Path, capsys) -> None:
    rc = drills.main(["--only", "redis-idle", "--out", str(tmp_path), "--train-seconds", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    (result_file,) = tmp_path.glob("drills_*.json")
    result = json.loads(result_file.read_text())
    assert result["passed"] and [r["drill"] for r in result["rows"]] == ["redis-idle"]
    assert result["command"].startswith("python -m loadtest.drills --only redis-idle")
    assert result["machine"]["cpu_count"] and "redis-server" in result["stack"]
    md = result_file.with_suffix(".md").read_text()
    assert "| 1 | redis-idle |" in md and "| PASS |" in md
