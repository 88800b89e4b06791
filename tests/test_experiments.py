"""The experiment scripts produce their CSV, markdown table and plots (smoke size)."""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import svd_energy  # noqa: E402


def test_svd_energy_experiment_writes_results_and_compresses(tmp_path):
    svd_energy.main(["--quick", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")])
    assert len(os.listdir(tmp_path / "runs")) == 2  # runs stay out of the repository's runs/
    with open(tmp_path / "results.csv") as f:
        rows = {r["schedule"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "0.95-0.98"}
    assert float(rows["0.95-0.98"]["total_bytes_up"]) < float(rows["none"]["total_bytes_up"]) / 3
    assert "| schedule |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 5_000


# The checks below fake the runs (run_grid) so they compile nothing.
import privacy  # noqa: E402
import pytest  # noqa: E402
import reproduce  # noqa: E402
import temperature  # noqa: E402


@pytest.mark.parametrize("script, names", [(reproduce, reproduce.STUDIES), (privacy, privacy.PARTS)])
def test_only_is_in_the_help_with_its_names_and_checked(script, names, capsys, monkeypatch):
    monkeypatch.setattr(script, "run_grid", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit):
        script.main(["--help"])
    assert "--only" in capsys.readouterr().out.replace("\n", " ")
    with pytest.raises(SystemExit) as e:
        script.main(["--only", f"{names[0]},nosuch"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and all(n in err for n in names)


def _fake_grid(rows_of):
    def run_grid(name, cells, *, results_dir=None, runs_dir=None, extract=None):
        os.makedirs(results_dir, exist_ok=True)
        return [dict(labels, **rows_of(labels)) for labels, _ in cells]
    return run_grid


def test_reproduce_only_one_study_still_writes_the_top_level_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "run_grid", _fake_grid(lambda labels: {"student_accuracy": 0.8, "rounds": 5}))
    reproduce.main(["--quick", "--only", "reddi", "--results", str(tmp_path)])
    top = (tmp_path / "summary.md").read_text()
    assert "Reddi et al. 2021" in top and "Smoke run (`--quick`): 5 rounds" in top
    assert "Not run yet: mcmahan, fedprox, fedkd, feddf" in top


def test_privacy_plot_without_dp_rows_does_not_crash(tmp_path):
    privacy.plot(str(tmp_path), [], [])  # --only secagg,he with no dp results yet
    partial = [{"algorithm": "fedavg", "epsilon": "inf", "student_accuracy": 0.9, "student_calibrated_auc": 0.5}]
    privacy.plot(str(tmp_path), partial, [])
    assert (tmp_path / "privacy_vs_epsilon.png").exists()


def test_temperature_quick_summary_states_the_rounds_it_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(temperature, "run_grid", _fake_grid(lambda labels: {
        "student_accuracy": 0.5, "teacher_accuracy_mean": 0.6, "rounds": 3}))
    monkeypatch.setattr(temperature, "line_plot", lambda *a, **k: None)
    temperature.main(["--quick", "--results", str(tmp_path)])
    note = (tmp_path / "summary.md").read_text()
    assert "3 rounds" in note and "200 rounds" not in note
