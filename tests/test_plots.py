"""Pictures: ``distill report`` and ``distill inspect --plot`` write valid images whose plotted data are the
run's metrics and the cache's values."""

import base64
import json
import re

import numpy as np
import pytest
from conftest import run_cli

import pipeline
from pipeline import plots
from pipeline.report import cache_report

matplotlib = pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(train_cache, heldout_cache, student_config_dir, tmp_path_factory):
    """A distilled and a cross-entropy-only run of 4 logged steps, each evaluated on the held-out cache."""
    root = tmp_path_factory.mktemp("runs")
    for name, alpha in (("kd", "0.5"), ("ce", "0.0")):
        args = ["--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(root / name)]
        args += ["--max-steps", "4", "--log-every", "1", "--batch-size", "2", "--alpha", alpha]
        result = run_cli("student-train", *args, "--eval-cache", str(heldout_cache))
        assert result.exit_code == 0, result.output
    return root / "kd", root / "ce"


def read_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return matplotlib.image.imread(str(path))


def test_report_writes_a_png_of_several_runs(runs, tmp_path):
    out = tmp_path / "report.png"
    result = run_cli("report", *map(str, runs), "--out", str(out))
    assert result.exit_code == 0, result.output
    image = read_png(out)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert str(out) in result.output


def test_the_plotted_curves_are_the_metrics_and_the_held_out_points_are_eval_json(runs):
    kd, ce = (plots.run_series(folder) for folder in runs)
    figure = plots.draw_runs([kd, ce])
    lines = {line.get_label(): line for axis in figure.axes for line in axis.get_lines()}
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "kd", "ce"):
        line = lines[f"kd: {key}"]
        assert list(line.get_xdata()) == [record["step"] for record in records]
        assert list(line.get_ydata()) == pytest.approx([record[key] for record in records])
    assert "ce: kd" not in lines  # the CE-only run has no distillation term to draw
    kl_lines = [line for line in figure.axes[1].get_lines() if line.get_label() == "kd"]
    assert list(kl_lines[0].get_ydata()) == pytest.approx([record["kl_t1"] for record in records])
    evaluation = json.loads((runs[0] / "eval.json").read_text())
    point = lines["kd: held-out CE"]
    assert list(point.get_xdata()) == [records[-1]["step"]] and list(point.get_ydata()) == [evaluation["ce"]]
    matplotlib.pyplot.close(figure)


def test_report_as_html_embeds_the_picture(runs, tmp_path):
    out = tmp_path / "report.html"
    assert run_cli("report", str(runs[0]), "--out", str(out)).exit_code == 0
    page = out.read_text()
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(encoded).startswith(PNG_MAGIC)


def _damaged(tmp, name, text):
    """A run folder with one good metrics line, then ``name`` written as ``text``."""
    folder = tmp / "damaged"
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda runs, tmp: [str(tmp), "--out", str(tmp / "x.png")], "holds no metrics.jsonl"),
        (lambda runs, tmp: [str(runs[0]), "--out", str(tmp / "x.gif")], "should end in one of .png"),
        (
            lambda runs, tmp: [str(_damaged(tmp, "metrics.jsonl", "[1, 2]\n")), "--out", str(tmp / "x.png")],
            "line 1 is not",
        ),
        (lambda runs, tmp: [str(_damaged(tmp, "eval.json", "[1]")), "--out", str(tmp / "x.png")], "not the held-out"),
    ],
)
def test_report_refuses_what_it_cannot_draw_in_one_line(make_args, message, runs, tmp_path):
    result = run_cli("report", *make_args(runs, tmp_path))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_inspect_plot_draws_the_caches_mass_entropy_and_bytes(train_cache, tmp_path):
    out = tmp_path / "cache.png"
    result = run_cli("inspect", str(train_cache), "--plot", str(out), "--json")
    assert result.exit_code == 0, result.output
    read_png(out)
    report = cache_report(train_cache, histograms=True)
    cache = pipeline.open_cache(train_cache)
    assert sum(report["captured_mass_histogram"]["counts"]) == cache.manifest.tokens
    assert sum(report["teacher_entropy_histogram"]["counts"]) == len(cache)
    masses = [np.exp(row.logprobs[row.valid()].astype(np.float64)).sum() for row in cache]
    assert report["mean_captured_mass"] == pytest.approx(sum(masses) / cache.manifest.tokens)
    figure = plots.draw_cache(report)
    bars = figure.axes[2].patches
    assert [bar.get_height() for bar in bars] == pytest.approx(list(report["column_bytes_per_token"].values()))
    matplotlib.pyplot.close(figure)
