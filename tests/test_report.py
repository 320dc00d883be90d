"""The compare report (torchsphere.train.report / metrics / compare): statistics, table, plot, presets."""
from __future__ import annotations

import math
import statistics

import pytest

from torchsphere.train import CompareSpec, ConfigResult, list_presets, load_spec, read_metrics, write_report
from torchsphere.train.compare import run_configs, spec_from_models
from torchsphere.train.metrics import COLUMNS, read_summary, write_metrics, write_summary
from torchsphere.train.report import markdown_table, mean_std, steps_to_reach, table_rows


def fake_run(folder, test_curve, losses, final, best, time_per_step, steps=(100, 200, 300)):
    rows = [dict(step=s, epoch=0, lr=1e-3, train_loss=l, train_acc=0.5, val_acc=t, test_acc=t, wall_time=s / 10)
            for s, t, l in zip(steps, test_curve, losses)]
    write_metrics(folder / "metrics.csv", rows)
    write_summary(folder / "summary.json", dict(
        run=str(folder), dataset="synthetic", dataset_source="synthetic()", steps=steps[-1], batch_size=32,
        final=dict(test_acc=final), best=dict(test_acc=best), time_per_step_s=time_per_step,
        data=dict(train=10, val=2, test=5)))
    return folder


@pytest.fixture
def results(tmp_path):
    dirs = {}
    for name, seed, curve, final, best, tps in [
        ("cnn", 0, (0.5, 0.7, 0.8), 0.80, 0.78, 0.010), ("cnn", 1, (0.6, 0.75, 0.82), 0.82, 0.82, 0.012),
        ("sphere", 0, (0.7, 0.85, 0.86), 0.86, 0.85, 0.022), ("sphere", 1, (0.72, 0.81, 0.9), 0.90, 0.90, 0.022),
    ]:
        folder = tmp_path / name / str(seed)
        folder.mkdir(parents=True)
        dirs.setdefault(name, []).append(fake_run(folder, curve, (1.0, 0.5, 0.25), final, best, tps))
    return [ConfigResult.from_runs(name, runs) for name, runs in dirs.items()]


def test_metrics_csv_round_trip_is_exact(tmp_path):
    rows = [dict(step=5, epoch=0, lr=1e-3, train_loss=1 / 3, train_acc=0.1 + 0.2, val_acc=math.nan, test_acc=0.5,
                 wall_time=1.25)]
    write_metrics(tmp_path / "m.csv", rows)
    back = read_metrics(tmp_path / "m.csv")
    assert list(back[0]) == list(COLUMNS)
    assert back[0]["train_loss"] == 1 / 3 and back[0]["train_acc"] == 0.1 + 0.2 and math.isnan(back[0]["val_acc"])
    assert isinstance(back[0]["step"], int)
    write_summary(tmp_path / "s.json", {"a": 1})
    assert read_summary(tmp_path / "s.json") == {"a": 1}
    with pytest.raises(FileNotFoundError, match="metrics file"):
        read_metrics(tmp_path / "missing.csv")


def test_mean_std_and_steps_to_reach():
    assert mean_std([0.8, 0.82]) == pytest.approx((0.81, statistics.stdev([0.8, 0.82])))
    mean, std = mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)  # one seed: the spread is undefined, not zero
    assert all(math.isnan(v) for v in mean_std([math.nan]))
    rows = [dict(step=1, test_acc=0.5), dict(step=2, test_acc=0.9), dict(step=3, test_acc=0.95)]
    assert steps_to_reach(rows, 0.9) == 2 and steps_to_reach(rows, 0.99) is None


def test_table_values(results):
    header, cnn, sphere = table_rows(results, [0.8, 0.85, 0.9])
    assert header[:5] == ["configuration", "seeds", "final test %", "best-on-val test %", "peak test % (reported)"]
    assert cnn[2] == f"81.00 ± {100 * statistics.stdev([0.8, 0.82]):.2f}"
    assert sphere[3] == f"87.50 ± {100 * statistics.stdev([0.85, 0.9]):.2f}"
    assert header[5:8] == ["steps to 80%", "steps to 85%", "steps to 90%"]
    assert cnn[5:8] == ["300", "—", "—"]  # both seeds reach 80% at step 300, none 85%
    assert sphere[5:8] == ["200", "250", "300 (1/2)"]  # 85%: steps 200 and 300; 90%: only seed 1
    assert cnn[-1] == "1.00x" and sphere[-1] == f"{0.022 / 0.011:.2f}x"
    assert cnn[-2] == "11.0"


def test_report_files(results, tmp_path):
    table = write_report(results, tmp_path / "report", [0.8], title="T", notes="a note")
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.startswith("# T") and "a note" in text and table in text and "never used for selection" in text
    png = (tmp_path / "report" / "convergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert markdown_table([["a", "b"], ["1", "22"]]).splitlines()[1] == "|---|----|"
    with pytest.raises(ValueError, match="at least one configuration"):
        write_report([], tmp_path, [0.8])


def test_presets_are_valid():
    from torchsphere.data import list_datasets
    from torchsphere.models import list_models

    assert {"demo", "cifar10-official"} <= set(list_presets())
    for name in list_presets():
        spec = load_spec(name)
        configs = run_configs(spec, "out")  # builds and validates every TrainConfig
        assert all(c.model in list_models() for cs in configs.values() for c in cs)
        assert spec.fallback_dataset is None or spec.fallback_dataset in list_datasets()
    demo = run_configs(load_spec("demo"), "out")
    assert list(demo) == ["cnn9", "spherenet9-linear", "spherenet9-cosine", "spherenet9-sigmoid"]
    assert demo["spherenet9-sigmoid"][1].seed == 1 and demo["cnn9"][0].output == "out/runs/cnn9/seed_0"


def test_spec_from_models_and_bad_specs(tmp_path):
    spec = spec_from_models(["cnn9", "spherenet9"], ["linear", "cosine"], 2, {"steps": 5}, [0.9])
    assert [r["name"] for r in spec.runs] == ["cnn9", "spherenet9-linear", "spherenet9-cosine"]
    assert spec.seeds == [0, 1]
    with pytest.raises(ValueError, match="unique non-empty 'name'"):
        CompareSpec(runs=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="thresholds are accuracies"):
        CompareSpec(runs=[{"name": "a"}], thresholds=[80])
    with pytest.raises(ValueError, match="unknown compare keys"):
        CompareSpec.from_dict({"runs": [{"name": "a"}], "epoch": 3})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_spec("nope")


def test_report_states_the_measured_outcome(results, tmp_path):
    from torchsphere.train.report import outcome_lines

    lines = outcome_lines(results, [0.8, 0.85])
    assert lines[0] == "**Outcome against cnn:**"
    assert "- 80% (baseline at step 300): fewer steps: sphere" in lines
    assert "- 85%: cnn never reaches it; reached by sphere" in lines
    assert lines[-1] == "- final test accuracy: higher: sphere"  # 88 ± 2.8 vs 81 ± 1.4: beyond the spread
    write_report(results, tmp_path / "r", [0.8])
    assert "fewer steps: sphere" in (tmp_path / "r" / "report.md").read_text()


def test_one_seed_marks_the_spread_as_undefined(results):
    one = [ConfigResult(r.name, r.summaries[:1], r.curves[:1]) for r in results]
    header, cnn, sphere = table_rows(one, [0.8])
    assert cnn[2] == "80.00 (1 seed)" and "±" not in " ".join(cnn + sphere)
