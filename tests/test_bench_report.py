"""fastcm.perf.bench_report (benchmarks/report.py): percentiles, speedups, throughput and goal checks from a synthetic pytest-benchmark run."""
import pytest

from fastcm.perf import bench_report as report


def _entry(group, provider, data, **info):
    return {"name": f"{group}-{provider}", "stats": {"data": data, "median": sorted(data)[len(data) // 2]},
            "extra_info": dict(group=group, provider=provider, device="cpu-test", torch="x", **info)}


def test_rows_percentiles_speedup_and_goals(tmp_path):
    run = {"benchmarks": [
        _entry("pipeline:sample:cifar10-small:64", "eager", [0.3, 0.1, 0.2, 0.4, 0.5], items=64, items_unit="img"),
        _entry("pipeline:sample:cifar10-small:64", "compiled", [0.1] * 5, items=64, items_unit="img"),
        _entry("op:x:y:fwd", "eager", [2.0, 2.0], bytes=4e9),
    ]}
    rows = report.rows_from_run(run)
    eager, compiled, op = rows
    assert eager["median_ms"] == pytest.approx(300.0)
    assert eager["p20_ms"] == pytest.approx(180.0) and eager["p80_ms"] == pytest.approx(420.0)  # linear interp.
    assert compiled["speedup"] == pytest.approx(3.0)
    assert compiled["throughput"] == "640.0 img/s"
    assert op["throughput"] == "2.00 GB/s"
    goals = report.check_goals(rows)
    assert goals == [("compiled one-step sampling ≥1.5× eager", "pipeline:sample:cifar10-small:64",
                      pytest.approx(3.0), "met")]
    path = report.write_report(rows, tmp_path)
    text = path.read_text()
    assert "| compiled one-step sampling ≥1.5× eager |" in text and "met" in text
    assert (tmp_path / "cpu-test.csv").read_text().count("\n") == 4


def test_missing_or_foreign_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        report.main([str(bad)])
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
