"""`builder report` on a synthesized variant matrix, checked as a person sees it: rendered by headless Chromium.

The artifact folders are shaped exactly like real ones: tests/assets/report/ holds the manifest.json and config.json
of a real tiny-Llama nf4 build and the verify-report.json of a real build kept by `--keep-failed`; each artifact
of the matrix is that manifest with its name, source, sizes and verification figures replaced. It also holds two
real all-MiniLM-L6-v2 manifests, used unchanged: bnb int8 and an ONNX export.
"""

from __future__ import annotations

import ast
import hashlib
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from urllib.parse import unquote

import pytest

from builder import report_page, report_svg
from builder.cli import main
from builder.report import model_name, pareto_front, report_data, write_report

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "report"
LLAMA, MINILM = "models/tiny-llama", "models/tiny-minilm"
LM_METRICS = ("kl_divergence_mean", "top1_agreement", "perplexity_ratio")
# name -> (source, size in bytes, metrics, thresholds override, latency ms); nf4 is smaller than int8 and worse,
# nf4-dq smaller still and a little worse, fp4 as large as nf4 and worse on every metric (dominated).
LM = {
    "tiny-nf4": (110e6, {"kl_divergence_mean": 0.30, "top1_agreement": 0.70, "perplexity_ratio": 1.20}, 38.0),
    "tiny-nf4-dq": (104e6, {"kl_divergence_mean": 0.32, "top1_agreement": 0.69, "perplexity_ratio": 1.22}, 41.0),
    "tiny-fp4": (110e6, {"kl_divergence_mean": 0.45, "top1_agreement": 0.62, "perplexity_ratio": 1.35}, 37.0),
    "tiny-int8": (160e6, {"kl_divergence_mean": 0.02, "top1_agreement": 0.93, "perplexity_ratio": 1.02}, 90.0),
}
LM_THRESHOLDS = {"top1_agreement": 0.45, "kl_divergence": 1.5, "perplexity_ratio": 2.5, "footprint_ratio": 0.6}
INT8_THRESHOLDS = {"top1_agreement": 0.75, "kl_divergence": 0.15, "perplexity_ratio": 1.10, "footprint_ratio": 0.75}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs headless Chromium to render the page: "
    "`apt-get install -y chromium` (as root, `make chromium` does it)",
)


def _artifact(
    root: Path,
    name: str,
    source: str,
    size: float,
    metrics: dict,
    thresholds: dict,
    latency: float | None,
    task: str = "text-generation",
) -> Path:
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    manifest["name"] = manifest["recipe"]["name"] = name
    digest = hashlib.sha256(source.encode()).hexdigest()  # a local folder's revision is its content digest
    manifest["source"] |= {"model": source, "revision": f"sha256:{digest}", "task": task}
    manifest["footprint"] = {
        "source_bytes": 270e6 if source == LLAMA else 90e6,
        "artifact_bytes": int(size),
        "ratio": round(size / 270e6, 4),
    }
    manifest["recipe"]["quantize"] = (
        {"method": "bnb-8bit"}
        if "int8" in name
        else {"method": "bnb-4bit", "quant_type": name.split("-")[1], "double_quant": name.endswith("-dq")}
    )
    verification = manifest["verification"]
    verification |= {"task": task, "thresholds": thresholds, "failures": [], "passed": True}
    verification["metrics"] = {**metrics, "artifact_bytes": int(size) + 4096, "bits_per_param": 8 * size / 135e6}
    if latency is None:
        verification["performance"] = {}
    else:
        verification["performance"] |= {"candidate_latency_ms": latency, "reference_latency_ms": 30.0}
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "README.md").write_text(f"# {name}\n")
    config = json.loads((ASSETS / "config.json").read_text())
    if task != "text-generation":
        config |= {"architectures": ["BertModel"], "model_type": "bert"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _kept_failed(root: Path, name: str, metrics: dict, thresholds: dict) -> Path:
    """A build moved to .failed/ by --keep-failed: its files and verify-report.json, no manifest, no card."""
    report = json.loads((ASSETS / "failed-verify-report.json").read_text())
    report["metrics"] |= metrics
    report["thresholds"] = thresholds
    report["failures"] = [
        {
            "metric": "top1_agreement",
            "value": metrics["top1_agreement"],
            "threshold": thresholds["top1_agreement"],
            "message": f"top1_agreement {metrics['top1_agreement']:.3f} < {thresholds['top1_agreement']:.3f}",
        }
    ]
    report["performance"] |= {"candidate_footprint_bytes": 110_000_000, "candidate_latency_ms": 39.0}
    folder = root / ".failed" / name
    folder.mkdir(parents=True)
    (folder / "verify-report.json").write_text(json.dumps(report, indent=2))
    shutil.copy(ASSETS / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """artifacts/: four LM variants of one source, one kept failed build of it, two encoder variants of another,
    and what a report must leave out (a temporary build folder)."""
    root = tmp_path_factory.mktemp("matrix") / "artifacts"
    for name, (size, metrics, latency) in LM.items():
        _artifact(root, name, LLAMA, size, metrics, INT8_THRESHOLDS if "int8" in name else LM_THRESHOLDS, latency)
    _kept_failed(root, "tiny-nf4-strict", LM["tiny-nf4"][1], {**LM_THRESHOLDS, "top1_agreement": 0.9})
    encoder = {"cosine_min": 0.0, "cosine_mean": 0.0, "max_abs_diff": 0.0, "footprint_ratio": 0.5}
    _artifact(
        root,
        "minilm-int8",
        MINILM,
        23e6,
        encoder | {"cosine_min": 0.995, "max_abs_diff": 0.05},
        {"cosine": 0.99, "footprint_ratio": 0.8},
        None,
        task="feature-extraction",
    )
    _artifact(
        root,
        "minilm-nf4",
        MINILM,
        15e6,
        encoder | {"cosine_min": 0.95, "max_abs_diff": 0.21},
        {"cosine": 0.90, "footprint_ratio": 0.75},
        None,
        task="feature-extraction",
    )
    # An interrupted build's folder holds a manifest too; the report must not show it.
    temporary = _artifact(root, "tiny-unfinished", LLAMA, 50e6, LM["tiny-nf4"][1], LM_THRESHOLDS, None)
    temporary.rename(root / ".tmp-tiny-unfinished-abcd1234")
    return root


# --- the Pareto front --------------------------------------------------------------------------------------------


def test_pareto_keeps_what_nothing_beats_on_both_size_and_quality():
    points = [("small-bad", 1.0, 0.5), ("mid", 2.0, 0.8), ("big-best", 4.0, 0.95), ("dominated", 3.0, 0.7)]
    assert pareto_front(points, higher_is_better=True) == {"small-bad", "mid", "big-best"}


def test_pareto_lower_is_better_flips_the_quality_direction():
    points = [("a", 1.0, 0.5), ("b", 2.0, 0.1), ("c", 2.0, 0.6)]  # c: as large as b and worse
    assert pareto_front(points, higher_is_better=False) == {"a", "b"}
    assert pareto_front(points, higher_is_better=True) == {"a", "c"}


def test_pareto_ties_equal_points_both_stay_but_equal_size_and_worse_does_not():
    assert pareto_front([("a", 1.0, 0.5), ("b", 1.0, 0.5)], higher_is_better=True) == {"a", "b"}
    assert pareto_front([("a", 1.0, 0.5), ("b", 1.0, 0.4)], higher_is_better=True) == {"a"}
    assert pareto_front([("a", 1.0, 0.5), ("b", 2.0, 0.5)], higher_is_better=True) == {"a"}


def test_pareto_leaves_out_points_missing_a_figure():
    points = [("a", None, 0.99), ("b", 2.0, None), ("c", 3.0, 0.1)]
    assert pareto_front(points, higher_is_better=True) == {"c"}
    assert pareto_front([], higher_is_better=True) == set()


# --- the data -----------------------------------------------------------------------------------------------------


def test_report_groups_by_source_and_places_the_failed_build_with_its_siblings(matrix):
    data = report_data([matrix], matrix)
    groups = {g["source"]: g for g in data["groups"]}
    assert set(groups) == {LLAMA, MINILM}
    lm = groups[LLAMA]
    assert {a["name"]: a["status"] for a in lm["artifacts"]} == {
        "tiny-nf4": "passed",
        "tiny-nf4-dq": "passed",
        "tiny-fp4": "passed",
        "tiny-int8": "passed",
        "tiny-nf4-strict": "failed",
    }
    assert [c["metric"] for c in lm["charts"]] == list(LM_METRICS)
    for chart in lm["charts"]:
        assert chart["pareto"] == ["tiny-int8", "tiny-nf4", "tiny-nf4-dq"]  # fp4 dominated, failed never on it
    top1 = lm["charts"][1]
    assert {t["value"]: t["artifacts"] for t in top1["thresholds"]} == {
        0.45: ["tiny-fp4", "tiny-nf4", "tiny-nf4-dq"],
        0.75: ["tiny-int8"],
        0.9: ["tiny-nf4-strict"],
    }
    failed = next(a for a in lm["artifacts"] if a["status"] == "failed")
    assert failed["failed_metrics"] == ["top1_agreement"]
    assert failed["card"] == ".failed/tiny-nf4-strict/verify-report.json"  # no card: the gate's report
    assert failed["method"] == "bnb-4bit nf4" and failed["size_bytes"] == 110_000_000
    encoder = groups[MINILM]
    assert [c["metric"] for c in encoder["charts"]] == ["cosine_min"]  # max_abs_diff is not gated here
    assert encoder["charts"][0]["pareto"] == ["minilm-int8", "minilm-nf4"]
    assert all(a["latency_ms"] is None for a in encoder["artifacts"])


def test_a_failed_build_later_rebuilt_and_passing_is_marked_superseded_and_not_drawn(matrix, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(matrix, root)
    old = _kept_failed(root, "tiny-nf4", LM["tiny-nf4"][1], {**LM_THRESHOLDS, "top1_agreement": 0.9})
    os.utime(old / "verify-report.json", (0, 0))  # failed in 1970; the passing tiny-nf4 was built after
    out, data = write_report([root], root / "report.html")
    rows = [a for g in data["groups"] for a in g["artifacts"] if a["name"] == "tiny-nf4"]
    assert sorted((a["status"], a["superseded"]) for a in rows) == [("failed", True), ("passed", False)]
    page = out.read_text()
    assert 'data-artifact="tiny-nf4" data-status="failed"' not in page
    assert "superseded by a later passing build" in page


def test_cli_writes_the_page_and_json_prints_its_data(matrix, tmp_path, capsys):
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(matrix), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["html"] == str(out) and out.is_file()
    expected = report_data([matrix], out.parent)
    printed.pop("html"), printed.pop("generated_at"), expected.pop("generated_at")
    assert printed == expected
    card = next(a["card"] for g in printed["groups"] for a in g["artifacts"] if a["name"] == "tiny-int8")
    assert not card.startswith("/") and (out.parent / card).resolve() == (matrix / "tiny-int8" / "README.md").resolve()
    assert main(["report", str(matrix / "tiny-int8"), "--out", str(tmp_path / "one.html")]) == 0
    assert "wrote" in capsys.readouterr().out and "tiny-nf4" not in (tmp_path / "one.html").read_text()


def test_cli_without_artifacts_says_what_to_do(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert f"no artifacts under {tmp_path}" in err and "builder build" in err
    assert not (tmp_path / "r.html").exists()


def test_page_is_self_contained(matrix, tmp_path):
    out, _ = write_report([matrix], matrix / "report.html")
    page = out.read_text()
    assert "<script" not in page and "url(" not in page and "@import" not in page and " src=" not in page
    hrefs = [h.split('"')[0] for h in page.split('href="')[1:]]
    assert hrefs and all(not h.startswith(("http:", "https:", "//", "/")) for h in hrefs)
    assert all((out.parent / h).is_file() for h in hrefs)  # each card (or a failed build's report) is there


def test_importing_report_does_not_import_torch():
    code = "import sys, builder.report, builder.report_page; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


# --- what a person sees: the page rendered by headless Chromium --------------------------------------------------


class _Marks(html.parser.HTMLParser):
    """The chart marks in a DOM: scatter circles and threshold lines per chart, bars per measured field."""

    def __init__(self):
        super().__init__()
        self.charts: list[dict] = []
        self.bars: dict[str, list[dict]] = {}
        self._field = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "scatter" in (a.get("class") or ""):
            self.charts.append({"metric": a["data-metric"], "circles": [], "thresholds": []})
        elif tag == "svg" and "bars" in (a.get("class") or ""):
            self._field = a["data-field"]
        elif tag == "circle" and "data-artifact" in a:
            self.charts[-1]["circles"].append(a)
        elif tag == "line" and a.get("class") == "threshold" and "data-value" in a:
            self.charts[-1]["thresholds"].append(float(a["data-value"]))
        elif tag == "rect" and "data-artifact" in a:
            self.bars.setdefault(self._field, []).append(a)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to run as root with its sandbox; the page is our own file.
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--force-color-profile=srgb",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _pixels(png: Path) -> dict[tuple[int, int, int], int]:
    """Colour counts of an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes), decoded with zlib alone."""
    data = png.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    raw, step = zlib.decompress(idat), 3 if colour == 2 else 4
    stride, previous, counts = width * step, bytearray(width * step), {}
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up, corner = previous[i], previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        for i in range(0, stride, step):
            colour_key = (line[i], line[i + 1], line[i + 2])
            counts[colour_key] = counts.get(colour_key, 0) + 1
        previous = line
    return counts


@needs_chromium
def test_console_check_catches_a_page_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>throw new Error('drawn wrong')</script></body></html>")
    process = _chromium("--dump-dom", page.as_uri())
    assert any("drawn wrong" in line for line in _console_messages(process.stderr))


@needs_chromium
def test_rendered_page_shows_one_point_per_artifact_the_front_thresholds_and_the_failed_build(matrix):
    out, _ = write_report([matrix], matrix / "report.html")
    process = _chromium("--dump-dom", out.as_uri())
    assert process.returncode == 0, process.stderr[-2000:]
    assert _console_messages(process.stderr) == []
    marks = _Marks()
    marks.feed(process.stdout)
    assert [c["metric"] for c in marks.charts] == [*LM_METRICS, "cosine_min"]
    for chart in marks.charts[:3]:
        names = [c["data-artifact"] for c in chart["circles"]]
        assert sorted(names) == sorted([*LM, "tiny-nf4-strict"])  # one point per artifact, the failed one too
        assert {c["data-artifact"] for c in chart["circles"] if c["data-pareto"] == "true"} == {
            "tiny-nf4",
            "tiny-nf4-dq",
            "tiny-int8",
        }
        failed = [c for c in chart["circles"] if c["data-status"] == "failed"]
        assert [c["data-artifact"] for c in failed] == ["tiny-nf4-strict"] and failed[0]["class"] == "pt-failed"
        assert all(c["class"] != "pt-failed" for c in chart["circles"] if c["data-status"] == "passed")
        assert len(chart["thresholds"]) == len(set(chart["thresholds"])) >= 2
        # Every point lies inside the plot area.
        assert all(72 <= float(c["cx"]) <= 430 and 24 <= float(c["cy"]) <= 308 for c in chart["circles"])
    assert sorted(marks.charts[1]["thresholds"]) == [0.45, 0.75, 0.9]
    encoder = marks.charts[3]
    assert sorted(c["data-artifact"] for c in encoder["circles"]) == ["minilm-int8", "minilm-nf4"]
    assert sorted(encoder["thresholds"]) == [0.9, 0.99]
    assert set(marks.bars) == {"latency_ms", "throughput_tokens_per_s"}  # the encoders measured neither
    latency = {b["data-artifact"]: (b["data-status"], float(b["data-value"])) for b in marks.bars["latency_ms"]}
    assert latency == {
        "tiny-nf4": ("passed", 38.0),
        "tiny-nf4-dq": ("passed", 41.0),
        "tiny-fp4": ("passed", 37.0),
        "tiny-int8": ("passed", 90.0),
        "tiny-nf4-strict": ("failed", 39.0),
    }


@needs_chromium
def test_screenshot_shows_the_front_the_failed_build_and_the_gates_in_colour(matrix, tmp_path):
    out, _ = write_report([matrix], matrix / "report.html")
    shot = tmp_path / "shot.png"
    process = _chromium("--hide-scrollbars", "--window-size=1300,800", f"--screenshot={shot}", out.as_uri())
    assert shot.is_file(), process.stderr[-2000:]
    assert _console_messages(process.stderr) == []
    counts = _pixels(shot)
    # The CSS colours of report_page: passed points, Pareto points and the front, failed marks and gate lines.
    assert counts.get((0x4C, 0x72, 0xB0), 0) > 100
    assert counts.get((0xDD, 0x84, 0x52), 0) > 300
    assert counts.get((0xC4, 0x4E, 0x52), 0) > 300


def test_an_unreadable_manifest_is_left_out_and_named_on_the_page(matrix, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(matrix, root)
    (root / "tiny-fp4" / "manifest.json").write_text("{not json")
    out, data = write_report([root, root / "tiny-int8"], root / "report.html")
    assert [s["path"] for s in data["skipped"]] == [str((root / "tiny-fp4").resolve())]
    assert "manifest.json cannot be read" in data["skipped"][0]["reason"]
    names = [a["name"] for g in data["groups"] for a in g["artifacts"]]
    assert "tiny-fp4" not in names and names.count("tiny-int8") == 1  # passed twice, shown once
    assert "Left out:" in out.read_text() and "tiny-fp4" in out.read_text()


def test_one_source_reached_by_two_paths_is_one_group(tmp_path):
    root = tmp_path / "artifacts"
    nf4 = _artifact(root, "tiny-nf4", LLAMA, *LM["tiny-nf4"][:2], LM_THRESHOLDS, None)
    _artifact(root, "tiny-int8", "../../" + LLAMA, *LM["tiny-int8"][:2], INT8_THRESHOLDS, None)
    revision = json.loads((nf4 / "manifest.json").read_text())["source"]["revision"]
    for folder in root.iterdir():  # the same weights: the same content digest, whatever the path
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["source"]["revision"] = revision
        (folder / "manifest.json").write_text(json.dumps(manifest))
    [group] = report_data([root], root)["groups"]
    assert group["source"] == LLAMA and group["source_aliases"] == ["../../" + LLAMA]
    assert group["revision"] == revision and len(group["artifacts"]) == 2


def test_bits_axis_draws_bits_per_parameter_and_leaves_out_what_lacks_it(matrix, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(matrix, root)
    manifest = json.loads((root / "tiny-fp4" / "manifest.json").read_text())
    del manifest["verification"]["metrics"]["bits_per_param"]  # as an ONNX export's manifest
    (root / "tiny-fp4" / "manifest.json").write_text(json.dumps(manifest))
    out, data = write_report([root], root / "report.html", x="bits")
    assert data["x"] == {"axis": "bits", "field": "weight_bits_per_param", "label": "bits per parameter (weight files)"}
    page = out.read_text()
    assert 'data-artifact="tiny-fp4" data-status="passed" data-pareto=' not in page  # no scatter point
    assert "not drawn (no bits per parameter (weight files) or no top1_agreement): fp4" in page
    assert main(["report", str(root), "--x", "gigabytes"]) == 2


def test_real_minilm_bitsandbytes_and_onnx_manifests_compare_in_one_section(tmp_path):
    """Two real manifests, unchanged: all-minilm-l6-v2 as bnb int8 and as an ONNX export for the CPU provider."""
    root = tmp_path / "artifacts"
    for name in ("minilm-int8", "minilm-onnx-cpu"):
        (root / name).mkdir(parents=True)
        shutil.copy(ASSETS / f"{name}.manifest.json", root / name / "manifest.json")
        (root / name / "README.md").write_text(f"# {name}\n")
    out, data = write_report([root], root / "report.html")
    [group] = data["groups"]
    assert group["source"] == "../../models/all-minilm-l6-v2" and group["task"] == "feature-extraction"
    assert [c["metric"] for c in group["charts"]] == ["cosine_min", "max_abs_diff"]
    rows = {a["name"]: a for a in group["artifacts"]}
    onnx, int8 = rows["all-minilm-l6-v2-onnx-cpu"], rows["all-minilm-l6-v2-int8"]
    assert onnx["method"] == "onnx float32" and onnx["device"] == "CPUExecutionProvider"
    assert onnx["weight_bits_per_param"] is None
    assert onnx["latency_inputs"].startswith("the 18 verification prompts #")
    assert int8["method"] == "bnb-8bit" and int8["latency_inputs"] == "64 tokens, batch 1"
    page = out.read_text()
    assert page.count('data-artifact="all-minilm-l6-v2-onnx-cpu" data-status="passed"') == 3  # 2 charts, 1 bar


# --- untrusted names and malformed files ---------------------------------------------------------------------------

# What an artifact folder, a .failed/ folder, a model, a metric, a device or a message may be named: every character
# that means something in HTML, and a handler that would run if any of it were parsed as markup.
HOSTILE = "x<img src=x onerror=document.body.dataset.pwned=1>&\"'"
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "section", "div", "svg", "g", "line"}
PAGE_TAGS |= {
    "text",
    "circle",
    "path",
    "polyline",
    "rect",
    "ellipse",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "a",
    "wbr",
}


class _Tags(html.parser.HTMLParser):
    """Every element and attribute of a page, and the text and attribute values as a browser decodes them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _small(root: Path) -> Path:
    """artifacts/ with two LM variants of one source (a page with a scatter per metric and two gate lines)."""
    _artifact(root, "tiny-int8", LLAMA, *LM["tiny-int8"][:2], INT8_THRESHOLDS, 90.0)
    return _artifact(root, "tiny-nf4", LLAMA, *LM["tiny-nf4"][:2], LM_THRESHOLDS, 38.0)


def test_every_string_from_the_artifacts_reaches_the_page_escaped(tmp_path):
    root = tmp_path / "artifacts"
    _small(root)
    hostile = _artifact(root, "tiny-fp4", LLAMA + HOSTILE, *LM["tiny-fp4"][:2], LM_THRESHOLDS, 37.0)
    manifest = json.loads((hostile / "manifest.json").read_text())
    manifest["device"] = manifest["recipe"]["quantize"]["quant_type"] = HOSTILE
    manifest["verification"]["metrics"]["metric" + HOSTILE] = 0.5
    manifest["verification"]["failures"] = [{"metric": "m" + HOSTILE, "message": "message" + HOSTILE}]
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    _kept_failed(root, "failed" + HOSTILE, LM["tiny-nf4"][1], {**LM_THRESHOLDS, "top1_agreement": 0.9})
    broken = root / ("broken" + HOSTILE)
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json " + HOSTILE)
    # an artifact name outside the name pattern is a malformed manifest since issue 26: left out, its path shown
    misnamed = _artifact(root, "tiny-nf4" + HOSTILE, LLAMA, *LM["tiny-nf4"][:2], LM_THRESHOLDS, 38.0)
    out, data = write_report([root], root / "report.html")
    assert sorted(s["path"] for s in data["skipped"]) == sorted([str(broken.resolve()), str(misnamed.resolve())])
    page = _Tags()
    page.feed(out.read_text())
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS  # no <img> from a name
    assert not [attrs for _, attrs in page.tags if "onerror" in attrs or "src" in attrs]
    text = "".join(page.text)
    for shown in ("tiny-nf4" + HOSTILE, "failed" + HOSTILE, LLAMA + HOSTILE, "metric" + HOSTILE, "message" + HOSTILE):
        assert shown in text  # as the person reading the page sees it
    names = {attrs.get("data-artifact") for _, attrs in page.tags} - {None}
    assert {"tiny-fp4", "failed" + HOSTILE} <= names
    sections = {attrs["data-source"] for tag, attrs in page.tags if tag == "section"}
    assert sections == {LLAMA + HOSTILE, LLAMA, "unknown source"}  # the failed build's config matches both
    links = {unquote(attrs["href"]) for tag, attrs in page.tags if tag == "a"}
    assert "tiny-fp4/README.md" in links and all((out.parent / link).is_file() for link in links)


@needs_chromium
def test_a_failed_build_named_like_markup_runs_no_script_in_a_browser(tmp_path):
    """Issue #26: `.failed/nf4<img src=x onerror=...>` (no manifest) ran its handler from the gate line's title."""
    root = tmp_path / "artifacts"
    _small(root)
    _kept_failed(root, "nf4<img src=x onerror=document.body.dataset.pwned=1>", LM["tiny-nf4"][1], LM_THRESHOLDS)
    out, _ = write_report([root], root / "report.html")
    process = _chromium("--dump-dom", out.as_uri())
    assert process.returncode == 0, process.stderr[-2000:]
    assert "data-pwned" not in process.stdout
    assert "nf4&lt;img src=x onerror=document.body.dataset.pwned=1&gt;" in process.stdout  # shown as text


# Each: the file, what is written over it (a JSON path to a value), and the field the reason names.
MALFORMED = {
    "metric 1e308": (("metrics", "kl_divergence_mean"), 1e308, "metrics.kl_divergence_mean"),
    "metric NaN": (("metrics", "top1_agreement"), float("nan"), "metrics.top1_agreement"),
    "threshold NaN": (("thresholds", "kl_divergence"), float("nan"), "thresholds.kl_divergence"),
    "threshold string": (("thresholds", "kl_divergence"), "1.5", "thresholds.kl_divergence"),
    "threshold list": (("thresholds", "kl_divergence"), [1.5], "thresholds.kl_divergence"),
    "failures of strings": (("failures",), ["x"], "failures.0"),
    "metrics a list": (("metrics",), [0.3], "metrics"),
    "metrics a string": (("metrics",), "0.3", "metrics"),
    "performance a list": (("performance",), [38.0], "performance"),
    "performance a string": (("performance",), "fast", "performance"),
    "latency 1e308": (("performance", "candidate_latency_ms"), 1e308, "performance.candidate_latency_ms"),
    "report a list": ((), [], "(top level)"),
}


@pytest.mark.parametrize("where", ["manifest.json", "verify-report.json"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_figure_leaves_the_artifact_out_with_the_reason(tmp_path, capsys, case, where):
    keys, value, field = MALFORMED[case]
    root = tmp_path / "artifacts"
    _small(root)
    if where == "manifest.json":
        folder = root / "tiny-nf4"
        document = json.loads((folder / where).read_text())
        keys = ("verification", *keys)
        field = "verification" if field == "(top level)" else f"verification.{field}"
    else:
        folder = _kept_failed(root, "tiny-nf4-strict", LM["tiny-nf4"][1], LM_THRESHOLDS)
        document = json.loads((folder / where).read_text())
    if keys:
        parent = document
        for key in keys[:-1]:
            parent = parent[key]
        parent[keys[-1]] = value
    else:
        document = value
    (folder / where).write_text(json.dumps(document))
    out = tmp_path / "report.html"
    assert main(["report", str(root), "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [skipped] = data["skipped"]
    assert skipped["path"] == str(folder.resolve())
    assert skipped["reason"].startswith(f"{where} cannot be read (") and f"({field}: " in skipped["reason"]
    assert "instance of" not in skipped["reason"]  # no class name of the report's models
    shown = sorted(a["name"] for g in data["groups"] for a in g["artifacts"])
    assert shown == (["tiny-int8", "tiny-nf4"] if where == "verify-report.json" else ["tiny-int8"])
    page = out.read_text()
    assert "Left out:" in page and html.escape(skipped["reason"]) in page


def test_a_manifest_whose_own_figure_is_not_finite_is_left_out(tmp_path):
    root = tmp_path / "artifacts"
    nf4 = _small(root)
    manifest = json.loads((nf4 / "manifest.json").read_text())
    manifest["bits_per_param"] = float("nan")
    (nf4 / "manifest.json").write_text(json.dumps(manifest))
    data = report_data([root], root)
    assert [(s["path"], s["reason"]) for s in data["skipped"]] == [
        (str(nf4.resolve()), "manifest.json cannot be read (bits_per_param: Input should be a finite number (nan))")
    ]


def test_a_failed_build_whose_config_is_not_an_object_is_drawn_without_a_source(tmp_path):
    root = tmp_path / "artifacts"
    _small(root)
    failed = _kept_failed(root, "tiny-nf4-strict", LM["tiny-nf4"][1], LM_THRESHOLDS)
    (failed / "config.json").write_text('["not", "a", "config"]')
    (root / "tiny-int8" / "config.json").write_text('{"quantization_config": "bnb"}')
    data = report_data([root], root)
    groups = {g["source"]: [a["name"] for a in g["artifacts"]] for g in data["groups"]}
    assert groups == {LLAMA: ["tiny-nf4", "tiny-int8"], None: ["tiny-nf4-strict"]} and data["skipped"] == []


def test_a_tiny_metric_on_a_log_scale_sits_on_its_floor(tmp_path):
    root = tmp_path / "artifacts"
    nf4 = _small(root)
    manifest = json.loads((nf4 / "manifest.json").read_text())
    manifest["verification"]["metrics"]["kl_divergence_mean"] = 5e-324  # the smallest float above 0
    (nf4 / "manifest.json").write_text(json.dumps(manifest))
    out, data = write_report([root], root / "report.html")
    assert data["skipped"] == []
    marks = _Marks()
    marks.feed(out.read_text())
    kl = marks.charts[0]
    assert kl["metric"] == "kl_divergence_mean" and len(kl["circles"]) == 2
    assert all(72 <= float(c["cx"]) <= 430 and 24 <= float(c["cy"]) <= 308 for c in kl["circles"])


def test_markup_is_written_only_as_literal_templates_that_escape_what_fills_them():
    """By construction: a string can reach the page only through `html()` or `join()`, which escape it; so no
    f-string, concatenation or `Html(...)` of anything but a literal builds markup in the report's page or charts."""
    for module in (report_page, report_svg):
        tree = ast.parse(Path(module.__file__).read_text())
        where = Path(module.__file__).name
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(part.value for part in node.values if isinstance(part, ast.Constant))
                assert "<" not in text, f"{where}:{node.lineno}: markup in an f-string; write an html() template"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Html":
                arg = node.args[0]
                assert isinstance(arg, ast.Constant) or (isinstance(arg, ast.Name) and arg.id == "_CSS"), where
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "html":
                # A Name: a template chosen between two literals.
                assert isinstance(node.args[0], (ast.Constant, ast.Name)), f"{where}:{node.lineno}: not a literal"


# --- layout: what a newcomer saw (#30), measured in Chromium --------------------------------------------------------

# Appended to a copy of the page (the page itself runs no script): every chart's text, bar and tick boxes relative to
# its SVG, and the widths of the page and each table box, written into the DOM for --dump-dom.
_MEASURE = """<script>
window.addEventListener('load', () => {
  const out = {page: document.documentElement.scrollWidth, window: window.innerWidth, tables: [], charts: []};
  for (const t of document.querySelectorAll('.table'))
    out.tables.push({scroll: t.scrollWidth, client: t.clientWidth, right: t.getBoundingClientRect().right});
  for (const svg of document.querySelectorAll('svg.chart')) {
    const o = svg.getBoundingClientRect(), marks = [];
    for (const el of svg.querySelectorAll('text, rect, line.reference, line.source-line')) {
      const b = el.getBoundingClientRect();
      marks.push({tag: el.tagName, cls: el.getAttribute('class') || '',
                  text: el.tagName === 'text' ? el.textContent : '',
                  left: b.left - o.left, right: b.right - o.left, top: b.top - o.top, bottom: b.bottom - o.top});
    }
    out.charts.push({cls: svg.getAttribute('class'), width: o.width, height: o.height, marks});
  }
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _layout(page: Path, width: int = 900) -> dict:
    measured = page.with_name("measured.html")
    measured.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))
    process = _chromium(f"--window-size={width},800", "--dump-dom", measured.as_uri())
    assert _console_messages(process.stderr) == [], process.stderr[-2000:]
    found = process.stdout.split('<pre id="layout">')[1].split("</pre>")[0]
    return json.loads(html.unescape(found))


def _overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def _minilm_pair(root: Path, names=("minilm-int8", "minilm-onnx-cpu")) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        shutil.copy(ASSETS / f"{name}.manifest.json", root / name / "manifest.json")
    return root


def test_a_section_is_titled_by_the_model_name_never_a_relative_path(tmp_path):
    root = _minilm_pair(tmp_path / "artifacts")
    hub = _artifact(root, "smollm2-int8", "HuggingFaceTB/SmolLM2-135M-Instruct", 160e6, LM["tiny-int8"][1], {}, None)
    manifest = json.loads((hub / "manifest.json").read_text())
    manifest["source"]["revision"] = "a" * 40  # a Hub commit
    (hub / "manifest.json").write_text(json.dumps(manifest))
    out, data = write_report([root], root / "report.html")
    assert [(g["model"], g["source"]) for g in data["groups"]] == [
        ("all-minilm-l6-v2", "../../models/all-minilm-l6-v2"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ]
    titles = re.findall(r"<h2>(.*?)</h2>", out.read_text())
    assert titles == ["all-minilm-l6-v2", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "from ../../models/all-minilm-l6-v2;" in out.read_text()  # where it was read from, said once
    assert model_name("/tmp/rep/tiny/") == "tiny" and model_name(None) is None


def test_latencies_on_different_inputs_get_their_own_charts_said_not_comparable(matrix, tmp_path):
    root = _minilm_pair(tmp_path / "artifacts")
    out, data = write_report([root], root / "report.html")
    rows = {a["name"]: a for a in data["groups"][0]["artifacts"]}
    assert rows["all-minilm-l6-v2-int8"]["latency_inputs_id"] != rows["all-minilm-l6-v2-onnx-cpu"]["latency_inputs_id"]
    marks = _Tags()
    marks.feed(out.read_text())
    latency = [a for tag, a in marks.tags if tag == "svg" and a.get("data-field") == "latency_ms"]
    assert len(latency) == 2  # one bar each, never on one axis
    page = out.read_text()
    assert page.count("other inputs than the other latency charts: not comparable") == 2
    assert "latency per forward on 64 tokens, batch 1 (ms" in page
    assert "latency per forward on the 18 verification prompts #" in page
    # Each bar named as in the scatters, shortened against the whole section, not its own chart.
    assert 'text-anchor="end">onnx-cpu</text><rect class="bar-passed" data-artifact="all-minilm-l6-v2-onnx-cpu"' in page
    # Builds timed on the same inputs share one chart, and nothing says they are not comparable.
    same, _ = write_report([matrix], tmp_path / "same.html")
    assert same.read_text().count('data-field="latency_ms"') == 1 and "not comparable" not in same.read_text()


@needs_chromium
def test_every_label_fits_its_chart_and_no_tick_crosses_a_label(matrix, tmp_path):
    real = _minilm_pair(tmp_path / "real")  # its two latencies on two kinds of inputs, the ONNX one long-named
    long = "smollm2-135m-instruct-bnb-4bit-nf4-double-quant-cpu-float32-compute"
    _artifact(tmp_path / "one", long, LLAMA, *LM["tiny-nf4"][:2], LM_THRESHOLDS, 38.0)
    for folders in ([matrix, real], [tmp_path / "one"]):
        folder = folders[-1]
        out, _ = write_report(folders, folder / "report.html")
        layout = _layout(out)
        assert layout["charts"]
        for chart in layout["charts"]:
            texts = [m for m in chart["marks"] if m["tag"] == "text"]
            for text in texts:  # nothing cut at an edge
                assert 0 <= text["left"] and text["right"] <= chart["width"], (chart["cls"], text)
                assert 0 <= text["top"] and text["bottom"] <= chart["height"], (chart["cls"], text)
            # A bar's source tick crosses no text; the scatter's source line not its own label, the title, a gate's.
            for tick in (m for m in chart["marks"] if m["cls"] == "reference"):
                assert not [t for t in texts if _overlap(tick, t)], (chart["cls"], tick)
            labels = [t for t in texts if t["cls"] in ("source-label", "title", "threshold-label")]
            for line in (m for m in chart["marks"] if m["cls"] == "source-line"):
                assert not [t for t in labels if _overlap(line, t)], (chart["cls"], line)
        bars = [c for c in layout["charts"] if "bars" in c["cls"]]
        labels = {m["text"] for c in bars for m in c["marks"] if m["tag"] == "text"}
        if folder.name == "one":
            assert long in labels and "38 · source 30" in labels  # the full name; the tick's value beside it
    source = [m for c in layout["charts"] if "scatter" in c["cls"] for m in c["marks"] if m["cls"] == "source-label"]
    assert source and all(m["text"] == "source 270 MB" for m in source)


@needs_chromium
def test_the_table_wraps_its_headers_and_scrolls_in_its_own_box_not_the_page(matrix):
    out, _ = write_report([matrix], matrix / "report.html")
    layout = _layout(out, width=900)
    assert layout["page"] <= layout["window"]  # the page never scrolls sideways
    for table in layout["tables"]:
        assert table["right"] <= layout["window"] and table["client"] < table["scroll"]
    assert "<th>kl_<wbr>divergence_<wbr>mean</th>" in out.read_text()
    wide = _layout(out, width=2000)
    assert all(t["scroll"] <= t["client"] for t in wide["tables"])  # room enough: no scrolling at all


def test_a_single_artifact_is_drawn_against_the_source_from_zero_with_distinct_ticks(tmp_path):
    root = _minilm_pair(tmp_path / "artifacts", names=("minilm-onnx-cpu",))
    out, _ = write_report([root], root / "report.html")
    page = out.read_text()
    cosine = page.split('data-metric="cosine_min"')[1].split("</svg>")[0]
    ticks = re.findall(r'text-anchor="(?:middle|end)">([^<]+)</text>', cosine)
    x_ticks = [t for t in ticks if t.endswith("B")]
    y_ticks = [t for t in ticks if not t.endswith("B")]
    assert x_ticks[0] == "0 B" and len(x_ticks) >= 4  # the size read against 0 and the source's 90.9 MB
    assert len(y_ticks) >= 3 and len(set(y_ticks)) == len(y_ticks), y_ticks  # not "1, 1, 1, 0.9999"
    assert '<text class="source-label"' in cosine and "source 90.9 MB</text>" in cosine
    marks = _Marks()
    marks.feed(page)
    [point] = marks.charts[0]["circles"]
    assert 72 + 200 < float(point["cx"]) < 430  # near the source line at the right, not alone in a corner
