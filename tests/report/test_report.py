from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from mmkd.report import read_metrics_csv, read_run, write_report

ROOT = Path(__file__).resolve().parents[2]


class _Page(HTMLParser):
    """The images, links and table cells of a report page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(values)
        elif tag == "a":
            self.links.append(values.get("href", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def table(self, header: list[str], row: str) -> dict[str, list[str]]:
        """The first table with this header row and a row labelled ``row``, as ``{row label: cells}``."""
        for table in self.tables:
            rows = {cells[0]: cells[1:] for cells in table[1:]}
            if table and table[0] == header and row in rows:
                return rows
        raise AssertionError(f"no table with header {header} and row {row!r}; headers: {[t[0] for t in self.tables]}")


def _check_images(page: Path) -> _Page:
    """Every PNG next to the page is embedded and linked, every embedded image is one of them, all are images."""
    parsed = _Page(page.read_text())
    files = {p.name for p in page.parent.glob("*.png")}
    assert files and {img["data-file"] for img in parsed.images} == files
    assert {link for link in parsed.links if link.endswith(".png")} == files
    for img in parsed.images:
        assert img["src"].startswith("data:image/png;base64,")
        png = (page.parent / img["data-file"]).read_bytes()
        assert base64.b64decode(img["src"].split(",", 1)[1]) == png
        with Image.open(page.parent / img["data-file"]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 150
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # drawn, not a blank canvas
    return parsed


def test_read_metrics_csv_keeps_the_resumed_run_and_skips_empty_cells(tmp_path: Path, write_run) -> None:
    write_run(tmp_path / "run", {"sft": {"steps": 8, "terms": ["lm"], "resumed": True}})
    history = read_metrics_csv(tmp_path / "run" / "stages" / "sft" / "logs" / "metrics.csv")
    assert set(history) == {"train/lm", "train/loss", "train/lr", "perf/samples_per_s", "perf/step_time_s",
                            "val/loss"}
    loss = history["train/loss"]
    assert loss.steps == tuple(range(8))
    assert loss.values[3] == pytest.approx(2.0 + math.exp(-1))  # before the resume
    assert loss.values[4] == pytest.approx(2.0 + math.exp(-4 / 3) - 0.5)  # the later row
    assert history["val/loss"].steps == (7,) and history["val/loss"].values == (3.0,)
    assert history["train/lr"].values[0] == pytest.approx(1e-3 / 3)
    assert read_metrics_csv(tmp_path / "absent.csv") == {}


def test_read_run_is_forgiving(tmp_path: Path, write_run, eval_metrics, answers) -> None:
    run = read_run(write_run(tmp_path / "run", {"distill": {"logs": False}, "sft": {"steps": 0, "status": "failed"}}))
    assert [s.name for s in run.stages] == ["distill", "sft"] and run.evals == ()
    assert run.stages[0].history == {} and run.stages[0].global_step == 8
    assert run.stages[0].data["reader"] == {"records": 144, "skipped_bad": 2}
    assert run.stages[1].status == "failed" and run.stages[1].metrics == {}
    assert any("stage distill: no logged metrics" in n for n in run.notes)
    assert any(n.startswith("no evaluation") for n in run.notes)

    teacher = read_run(write_run(tmp_path / "teacher", {}, {"teacher/test-generate": eval_metrics(answers)},
                                 manifest=False), name="teacher")
    assert teacher.name == "teacher" and teacher.stages == () and teacher.provenance == {}
    assert [(e.stage, e.name) for e in teacher.evals] == [("teacher", "test-generate")]
    assert teacher.notes == ("manifest.json is absent: no stages to show",)
    (tmp_path / "teacher" / "manifest.json").write_text("{not json")
    assert read_run(tmp_path / "teacher").notes[0] == "manifest.json is unreadable: no stages to show"
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        read_run(tmp_path / "absent")


def test_report_of_one_run(tmp_path: Path, write_run, eval_metrics, answers) -> None:
    evals = {"sft/test-generate": eval_metrics(answers), "sft/test-likelihood": eval_metrics(answers, "likelihood")}
    run = write_run(tmp_path / "kd", {"distill": {"steps": 8}, "sft": {"steps": 6, "terms": ["lm"]}}, evals)
    page = write_report([run])
    assert page == run / "report" / "index.html"
    assert sorted(p.name for p in page.parent.glob("*.png")) == [
        "distill-loss.png", "distill-optimisation.png", "eval-test-generate.png", "eval-test-likelihood.png",
        "sft-loss.png", "sft-optimisation.png"]
    parsed = _check_images(page)
    html = page.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html  # nothing to fetch

    summary = parsed.table(["", "kd"], "status")  # the first stage's
    assert summary["status"] == ["done"] and summary["optimizer steps"] == ["8"] and summary["wall time (s)"] == ["12"]
    assert summary["final train/kl"] == ["4.194"]  # 2 * (2 + exp(-7 / 3))
    assert summary["student"] == ["stages/distill/student"]
    assert parsed.table(["", "kd"], "packages.torch")["packages.torch"] == ["2.14.1"]
    generate = parsed.table(["", "kd"], "mode")
    assert generate["mode"] == ["generate"]
    assert generate["overall"] == ["62.50 (5/8)"] and generate["IMG"] == ["50.00 (2/4)"]
    assert generate["failed parses"] == ["2"] and generate["letters beyond the options"] == ["0"]
    assert generate["lmms-eval exact match"] == ["87.50 (7/8)"] and generate["lmms-eval exact match IMG"] == [
        "75.00 (3/4)"]
    data = parsed.table(["", "kd"], "reader.records")
    assert data["samples"] == ["128"] and data["reader.skipped_bad"] == ["2"]
    assert "learning rate and throughput not logged" not in html


def test_report_comparing_teacher_and_two_students(tmp_path: Path, write_run, eval_metrics, answers) -> None:
    teacher = write_run(tmp_path / "teacher", {}, {"teacher/test-generate": eval_metrics(["A"] * 8)}, manifest=False)
    kd = write_run(tmp_path / "kd", {"distill": {"steps": 8}, "sft": {"steps": 6, "lr": False}},
                   {"sft/test-generate": eval_metrics(answers)})
    nokd = write_run(tmp_path / "nokd", {"sft": {"steps": 6, "lr": False, "logs": False}},
                     {"sft/test-generate": eval_metrics([None] * 8)})
    out = tmp_path / "demo-report"
    page = write_report([teacher, kd, nokd], out=out, names=["teacher", "KD student", "no-KD student"])
    assert page == out / "index.html"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "distill-loss.png", "distill-optimisation.png", "eval-test-generate.png", "sft-loss.png"]
    parsed = _check_images(page)
    html = page.read_text()
    assert "<title>mmkd report: teacher vs KD student vs no-KD student</title>" in html
    scores = parsed.table(["", "teacher", "KD student", "no-KD student"], "overall")
    assert scores["overall"] == ["37.50 (3/8)", "62.50 (5/8)", "0.00 (0/8)"]
    assert scores["missing answers"] == ["0", "0", "8"]
    assert scores["NAT"] == ["50.00 (2/4)", "75.00 (3/4)", "0.00 (0/4)"]
    assert parsed.table(["", "KD student"], "status")["optimizer steps"] == ["8"]  # distill: only the KD run has it
    assert parsed.table(["", "KD student", "no-KD student"], "status")["status"] == ["done", "done"]
    assert "learning rate and throughput not logged" in html  # sft logged neither
    assert "no-KD student: stage sft: no logged metrics" in html and "teacher: manifest.json is absent" in html

    with pytest.raises(ValueError, match="2 names for 3 run directories"):
        write_report([teacher, kd, nokd], names=["a", "b"])
    assert write_report([kd, nokd]) == kd / "report" / "compare" / "index.html"


def test_runs_with_one_folder_name_get_told_apart(tmp_path: Path, write_run) -> None:
    a = write_run(tmp_path / "a" / "run", {"sft": {"steps": 3}})
    b = write_run(tmp_path / "b" / "run", {"sft": {"steps": 3}})
    parsed = _Page(write_report([a, b], out=tmp_path / "out").read_text())
    assert parsed.table(["", "a/run", "b/run"], "status")["optimizer steps"] == ["3", "3"]


def test_page_renders_in_headless_chromium(tmp_path: Path, screenshot, write_run, eval_metrics, answers) -> None:
    kd = write_run(tmp_path / "kd", {"distill": {"steps": 8}, "sft": {"steps": 6}},
                   {"sft/test-generate": eval_metrics(answers)})
    nokd = write_run(tmp_path / "nokd", {"sft": {"steps": 6}}, {"sft/test-generate": eval_metrics(["A"] * 8)})
    shot = screenshot(write_report([kd, nokd], out=tmp_path / "report"))
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1280, 2000)
        colours = rgb.getcolors(maxcolors=1 << 22)
    assert len(colours) > 200  # text, tables and antialiased plot lines, not a blank or one-colour page
    assert max(count for count, _ in colours) < 0.95 * 1280 * 2000
    # The runs' colours (matplotlib's first two) are on the page: swatches and plotted lines.
    present = {c for _, c in colours}
    for run_colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert run_colour in present


@pytest.fixture(scope="module")
def real_run(tiny_assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of recipes/debug.yaml (2 steps per stage) and a likelihood evaluation, through the mmkd command."""
    from mmkd.cli import main

    run = tmp_path_factory.mktemp("report") / "debug"
    fit = ["fit", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run), "--data_root", tiny_assets["root"],
           "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    assert main(fit) == 0
    assert main(["eval", str(run), "--data", f"sqa:{tiny_assets['sqa']}", "--split", "test", "--mode",
                 "likelihood", "--limit", "8"]) == 0
    return run


def test_report_of_a_real_run(real_run: Path, tmp_path: Path, write_run, eval_metrics, answers) -> None:
    page = write_report([real_run])
    parsed = _check_images(page)
    stages = [p.name for p in sorted(page.parent.glob("*-loss.png"))]
    assert stages == ["distill-loss.png", "sft-loss.png"]
    for stage in ("distill", "sft"):  # learning rate and throughput are plotted where the training loop logs them
        header = (real_run / "stages" / stage / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
        logged = "train/lr" in header or any(c.startswith("perf/") for c in header)
        assert (page.parent / f"{stage}-optimisation.png").is_file() == logged
    scores = parsed.table(["", "debug"], "mode")
    assert scores["mode"] == ["likelihood"] and re.fullmatch(r"\d+\.\d\d \(\d/8\)", scores["overall"][0])
    summary = parsed.table(["", "debug"], "status")
    assert summary["status"] == ["done"] and summary["optimizer steps"] == ["2"]
    assert "final train/kl" in summary or "final train/lm" in summary

    other = write_run(tmp_path / "nokd", {"sft": {"steps": 2}}, {"sft/test-likelihood": eval_metrics(answers)})
    compare = write_report([real_run, other], out=tmp_path / "compare", names=["kd", "nokd"])
    _check_images(compare)
    assert _Page(compare.read_text()).table(["", "kd", "nokd"], "status")["optimizer steps"] == ["2", "2"]
