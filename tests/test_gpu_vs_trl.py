"""benchmarks/gpu_vs_trl.py --smoke: every job (DPO, GRPO, Online DPO) on both sides (alignlab, TRL 1.16) with tiny
shapes on the CPU, so that the GPU comparison is known to run before a GPU is lent."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.integration
def test_gpu_vs_trl_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import gpu_vs_trl

    rows = gpu_vs_trl.main(["--smoke", "--work", str(tmp_path)])
    assert [(r["job"], r["side"]) for r in rows] == [(job, side) for job in ("dpo", "grpo", "online-dpo")
                                                     for side in ("alignlab", "trl")]
    for row in rows:
        # alignlab's step times come from polling metrics.jsonl every 0.1 s, too coarse for a tiny model's step:
        # two rows can appear in one poll (0 s), so only the count and the sign are checked here
        assert row["steps_timed"] == 1 and row["median_step_seconds"] >= 0, row
        assert row["wall_seconds"] > 0 and row["peak_rss_mib"] > 0, row
    by = {(r["job"], r["side"]): r for r in rows}
    assert by["dpo", "alignlab"]["gradient_checkpointing"] == "off (auto)"  # tiny model: far below the share
    assert by["dpo", "trl"]["gradient_checkpointing"] == "on"  # TRL's default
    assert [json.loads(line)["job"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == \
        [r["job"] for r in rows]
    assert "results:" in capsys.readouterr().out
