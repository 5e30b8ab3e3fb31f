"""benchmarks.compare and benchmarks.profile_summary: the DBOS comparison's pure arithmetic."""

from __future__ import annotations

import pytest

from benchmarks.compare import (
    Figures,
    Verdict,
    Window,
    figures,
    lsn_bytes,
    markdown_table,
    median_figures,
    percentile,
    verdicts,
)
from benchmarks.profile_summary import group, parse, top


def a_window(**changes: object) -> Window:
    values: dict[str, object] = {
        "runs": 100,
        "seconds": 2.0,
        "latencies": [0.010] * 50 + [0.020] * 49 + [0.500],
        "xids": 500,
        "wal_bytes": 400_000,
        "cpu": 0.76,
        "postgres_cpu": 0.2,
        "nats_cpu": None,
        "foreign_transactions": 0,
        "loadavg": (1.0, 1.0, 1.0),
    }
    values.update(changes)
    return Window(**values)  # type: ignore[arg-type]


def some_figures(
    runs_per_s: float = 100.0, p50_ms: float | None = 10.0, cpu: float = 5.0
) -> Figures:
    return Figures(
        runs_per_s=runs_per_s,
        p50_ms=p50_ms,
        p99_ms=None if p50_ms is None else p50_ms * 2,
        write_xacts_per_run=5.0,
        wal_bytes_per_run=4000.0,
        cpu_ms_per_run=cpu,
        postgres_cpu_ms_per_run=1.0,
        nats_cpu_ms_per_run=None,
    )


def test_percentiles_take_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_an_lsn_is_a_byte_offset_across_its_two_halves() -> None:
    assert lsn_bytes("0/419B7E0") == 0x419B7E0
    assert lsn_bytes("1/0") - lsn_bytes("0/FFFFFFFF") == 1


def test_a_window_becomes_per_run_figures() -> None:
    f = figures(a_window())
    assert f.runs_per_s == 50.0
    assert f.p50_ms == pytest.approx(20.0)
    assert f.p99_ms == pytest.approx(500.0)
    assert f.write_xacts_per_run == 5.0
    assert f.wal_bytes_per_run == 4000.0
    assert f.cpu_ms_per_run == pytest.approx(7.6)
    assert f.postgres_cpu_ms_per_run == pytest.approx(2.0)
    assert f.nats_cpu_ms_per_run is None


def test_a_burst_has_no_per_run_latency() -> None:
    f = figures(a_window(latencies=None))
    assert f.p50_ms is None and f.p99_ms is None


def test_medians_are_per_figure_and_a_figure_missing_once_stays_missing() -> None:
    rounds = [some_figures(90.0, 12.0), some_figures(110.0, None), some_figures(100.0, 8.0)]
    m = median_figures(rounds)
    assert m.runs_per_s == 100.0
    assert m.p50_ms is None
    assert median_figures(rounds[:1] + rounds[2:]).p50_ms == 10.0


def test_a_verdict_says_how_far_from_its_goal() -> None:
    assert Verdict("t", "", 2.5, 2.0, True).met is True
    missed = Verdict("t", "", 0.5, 2.0, True)
    assert missed.met is False and missed.gap == 4.0
    assert Verdict("t", "", 1.4, 0.7, False).gap == pytest.approx(2.0)
    assert Verdict("t", "", None, 0.7, False).met is None


def test_issue_6_targets_are_ratios_of_the_medians() -> None:
    medians = {
        "ledgerflow": {
            "sequential": some_figures(p50_ms=6.0),
            "in_flight": some_figures(runs_per_s=250.0, cpu=4.0),
        },
        "dbos": {
            "sequential": some_figures(p50_ms=10.0),
            "in_flight": some_figures(runs_per_s=100.0, cpu=5.0),
        },
    }
    found = {v.target.split(":")[0]: v for v in verdicts(medians, {"ledgerflow": 40.0}, 31_000)}
    assert found["throughput, in flight"].value == 2.5 and found["throughput, in flight"].met
    assert found["sequential p50 latency"].value == pytest.approx(0.6)
    assert found["CPU per run, in flight"].value == pytest.approx(0.8)
    assert found["CPU per run, in flight"].met is False
    assert found["burst"].met is None  # DBOS's burst was not measured
    assert found["rebuild"].met is True


def test_the_table_has_a_ratio_row_per_workload() -> None:
    medians = {
        "ledgerflow": {"in_flight": some_figures(runs_per_s=50.0)},
        "dbos": {"in_flight": some_figures(runs_per_s=100.0)},
    }
    table = markdown_table(medians, {"in_flight": "(b)"}).splitlines()
    assert len(table) == 2 + 3
    assert table[-1].startswith("| (b) | ledgerflow/DBOS | 0.50x | 1.00x |")


def test_collapsed_stacks_give_each_function_its_own_and_total_share() -> None:
    lines = [
        "main (app.py);load (store.py);decode (json.py) 6",
        "main (app.py);load (store.py) 2",
        "main (app.py);send (nats.py);decode (json.py) 2",
        "not a stack line",
    ]
    p = parse(lines)
    assert p.samples == 10
    assert p.own["decode (json.py)"] == 8
    assert p.total["load (store.py)"] == 8
    assert p.share(p.total["main (app.py)"]) == 1.0
    assert top(p.own, 1, match="store") == [("load (store.py)", 2)]


def test_a_sample_goes_to_the_first_group_on_its_stack() -> None:
    lines = ["main;load;decode 6", "main;send;decode 2", "main 1"]
    groups = group(lines, [("loading", ["load"]), ("decoding", ["decode"])])
    assert groups == {"loading": 6, "decoding": 2, "other": 1}
