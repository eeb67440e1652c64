"""The benchmarks run (a tiny size; no timing is asserted here: figures live
in benchmarks/README.md). They exercise the same scripts as production, so a
changed script contract breaks them loudly here, not on the next bench run."""

from __future__ import annotations

import pytest

from engine.bench import run_durability_bench, run_engine_bench


@pytest.mark.timeout(120)
async def test_engine_bench_runs_and_the_ceiling_does_real_holds() -> None:
    r = await run_engine_bench(repeats=1, n=300)
    assert r["holds_per_s"] > 0 and r["ceiling_per_s"] > 0 and r["soldout_per_s"] > 0
    assert 0 < r["ratio"]
    assert set(r) >= {"holds_per_s", "ceiling_per_s", "ratio", "hardware"}


@pytest.mark.timeout(120)
async def test_durability_bench_runs() -> None:
    r = await run_durability_bench(quick=True, n=300)
    assert {"aof_always", "aof_everysec", "none"} <= set(r)
    assert all(r[m]["confirms_per_s"] > 0 for m in ("aof_always", "aof_everysec", "none"))
