"""report.html: one self-contained page (every image a data URI, no outside reference), the same
sections as report.md, sortable tables; report.md's links stay inside the run folder; and headless
Chromium renders the page (not blank, every section and image there, numeric column sort).

The run folder is written here without Ray: the stages' real table writers, artifact types and
confusion-matrix plot, small PIL images in place of the other plots."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from pipeline.common.artifacts import (Arm, ClassifierArtifact, DatasetArtifact, EvalArtifact, ModelArtifact,
                                       SampleArtifact)
from pipeline.common.files import write_json
from pipeline.config import load_config
from pipeline.stages.s4_evaluate import write_table
from pipeline.stages.s5_classify_report import plot_confusion, write_classify_table
from pipeline.stages.s6_report import run_report
from pipeline.stages.s6_report_html import markdown_to_html

CHROMIUM = Path("/usr/bin/chromium")
requires_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="no /usr/bin/chromium: `bash scripts/setup.sh --with-browser` installs it")
SECTIONS = ("Dataset", "Methods", "Training", "Generation quality", "Samples",
            "Classification (ResNet-32 on the balanced test set)", "Training-set composition (real + synthetic per class)",
            "Confusion matrices")
METHODS = ("ddpm", "cbdm")
CLASSES = [f"class{c}" for c in range(4)]
COUNTS = [120, 40, 12, 4]
IMAGES = 1 + len(METHODS) + 2 * len(METHODS) + 2 * len(METHODS) + 4  # counts, loss, eval plots, 2 grids, confusions


def _png(path: Path, seed: int, size=(320, 220)) -> None:
    """A small picture with structure (a gradient and coloured blocks), so a rendering of it is not blank."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(30, 220, w, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(200, 40, h, dtype=np.uint8)[:, None]
    for _ in range(6):
        x, y = rng.integers(0, w - 40), rng.integers(0, h - 40)
        img[y:y + 40, x:x + 40] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _eval_metrics(fid: float, few: float | None) -> dict:
    group = {"rate": 0.9, "low": 0.8, "high": 0.95}
    return {"num_samples": 40, "fid": fid, "fid_interval": [fid - 0.9, fid + 0.8], "fid_thirds_many": fid / 2,
            "fid_thirds_medium": fid, "fid_thirds_few": few, "class_fidelity": {"all": group, "few": group},
            "speckle": {"rate": 0.02, "low": 0.01, "high": 0.05}, "kernel_inception_distance_mean": 0.004,
            "precision": 0.7, "recall": 0.5, "inception_score_mean": 3.1, "prd_f8": 0.8, "prd_f1_8": 0.6,
            "memorization": {"thirds_few": 0.1}}


def _classifier_metrics(acc: float) -> dict:
    last = {"accuracy": acc, "macro_precision": acc, "macro_recall": acc, "macro_f1": acc, "many_accuracy": acc,
            "medium_accuracy": acc, "few_accuracy": acc / 2, "group_std": 0.05}
    return {"last": last, "best_accuracy": acc, "best_epoch": 1}


def write_run(root: Path):
    """A finished run folder (dataset beside it, as the pipeline lays it out) and the stages' artifacts."""
    cfg = load_config(REPO / "configs" / "digits_lt.yaml",
                      [f"output_dir={root}", f"train.methods=[{','.join(METHODS)}]"])
    run = cfg.run_dir
    run.mkdir(parents=True)
    write_json(run / "config.json", cfg.to_dict())
    data_dir = root / "datasets" / "digits-tiny"
    manifest = {"dataset": "digits", "profile": "exp", "imbalance_ratio": COUNTS[0] / COUNTS[-1],
                "num_train": sum(COUNTS), "num_test": 80, "class_names": CLASSES, "class_counts": COUNTS}
    data_dir.mkdir(parents=True)
    write_json(data_dir / "manifest.json", manifest)
    _png(data_dir / "class_counts.png", 0)
    data = DatasetArtifact(data_dir, manifest, skipped=True)
    models, evaluations, samples = {}, {}, {}
    for i, method in enumerate(METHODS):
        _png(run / "train" / method / "loss.png", 10 + i)
        models[method] = ModelArtifact(method, run / "train" / method, {"step": 3, "loss": 0.1 + i,
                                                                       "images_per_second": 50.0, "fit_seconds": 2},
                                       skipped=False)
        out = run / "evaluation" / method
        _png(out / "per_class_fid.png", 20 + i)
        _png(out / "memorization.png", 30 + i)
        # FIDs 9.5 and 12.3 sort differently as numbers and as text; the few-group FID of ddpm is n/a
        evaluations[method] = EvalArtifact(method, out, _eval_metrics(9.5 if i == 0 else 12.3, None if i == 0 else 20.0),
                                           skipped=False)
        for folder in (method, f"{method}-augment"):
            _png(run / "samples" / folder / "grid.png", 40 + i)
            write_json(run / "samples" / folder / "manifest.json",
                       {"num_images": 40, "sample": {"sampler": "ddim", "steps": 3, "omega": 1.0}})
        samples[method] = SampleArtifact(method, run / "samples" / method, 40, skipped=False)
    write_table(evaluations, run / "evaluation" / "table.md", {"extractor": "domain", "test_accuracy": 0.95})
    composition = {"class_names": CLASSES, "real": COUNTS, "synthetic": [0, 80, 108, 116], "filtered_out": [0] * 4}
    arms = [(Arm("ce", "ce"), 0.79), (Arm("rs", "rs"), 1.0), (Arm("syn-ddpm", "ce", "ddpm"), 0.095),
            (Arm("syn-cbdm", "ce", "cbdm"), 0.8)]
    classifiers = {}
    for k, (arm, acc) in enumerate(arms):
        matrix = np.diag([20, 20, 20, 20]) + np.random.default_rng(k).integers(0, 4, (4, 4))
        (run / "classify" / arm.name).mkdir(parents=True)
        plot_confusion(matrix, CLASSES, run / "classify" / arm.name / "confusion.png", arm.name)  # the real plot
        classifiers[arm.name] = ClassifierArtifact(arm, run / "classify" / arm.name, _classifier_metrics(acc),
                                                   composition, skipped=False)
    write_classify_table(cfg, data, classifiers, run / "classify" / "table.md")
    devices = {s: {"use_gpu": False, "bf16": s == "train", "channels_last": False, "fused_optimizer": False}
               for s in ("train", "sample", "evaluate", "classify")}
    outputs = {"data": data, "devices": {**devices, "cluster_gpus": 0.0}, "train": models, "sample": samples,
               "evaluate": evaluations, "classify": classifiers}
    return cfg, outputs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cfg, outputs = write_run(tmp_path_factory.mktemp("report"))
    md = run_report(cfg, outputs)
    return cfg, outputs, md, md.with_name("report.html")


def _markdown_images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_report_html_is_self_contained(report):
    _, _, md, page = report
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert 'http-equiv="Content-Security-Policy"' in text and "default-src 'none'" in text
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', text):
        assert value.startswith("data:image/") if attr == "src" else value.startswith("#"), (attr, value[:60])
    assert "<script src" not in text
    imgs = re.findall(r"<img\b[^>]*>", text)
    assert len(imgs) == len(_markdown_images(md.read_text())) == IMAGES
    for tag, target in zip(imgs, _markdown_images(md.read_text())):
        uri = re.search(r'src="data:image/png;base64,([^"]+)"', tag)
        assert uri, tag[:80]
        assert base64.b64decode(uri.group(1)) == (md.parent / target).read_bytes(), target
        Image.open(io.BytesIO(base64.b64decode(uri.group(1)))).verify()


def test_report_html_has_every_section_and_sortable_table(report):
    cfg, outputs, md, page = report
    text = page.read_text()
    headings = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h[23][^>]*>(.*?)</h[23]>", text)]
    for section in SECTIONS:
        assert section in headings, section
    for name in ("ddpm", "cbdm", "ddpm-augment", "cbdm-augment"):
        assert any(h.startswith(f"{name}: ") for h in headings), name
    assert "Devices (" in text and "train: CPU bf16" in text
    pipe_tables = sum(1 for block in md.read_text().split("\n\n") if block.lstrip().startswith("| "))
    assert text.count('<table class="sortable">') == pipe_tables == 6
    for header in ("<th scope=\"col\">FID [95% CI]</th>", "<th scope=\"col\">top-1 last (Δ CE)</th>",
                   "<th scope=\"col\">training images</th>"):
        assert header in text
    assert "<td class=num>9.50 [8.60, 10.30]</td>" in text and "<td>n/a</td>" in text
    assert "<strong>domain</strong>" in text and '<a href="#resolved-config"><code>config.json</code></a>' in text
    assert '<details id="resolved-config">' in text and f"&quot;name&quot;: &quot;{cfg.name}&quot;" in text
    for name in outputs["classify"]:
        assert f'alt="{name} confusion matrix"' in text


def test_report_md_links_stay_inside_a_copied_run_folder(report, tmp_path):
    cfg, outputs, md, _ = report
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(md.parent, copy)
    links = _markdown_images((copy / "report.md").read_text())
    assert "report_assets/class_counts.png" in links
    for link in links:
        assert not Path(link).is_absolute() and ".." not in Path(link).parts, link
        assert (copy / link).is_file(), link
    assert (copy / "report_assets/class_counts.png").read_bytes() == (outputs["data"].path / "class_counts.png").read_bytes()
    again = run_report(cfg, outputs)  # a rebuild reuses the same asset name
    assert sorted(p.name for p in (again.parent / "report_assets").iterdir()) == ["class_counts.png"]


def test_markdown_subset_converter(tmp_path):
    body, toc = markdown_to_html("# T\n\n## A & B\n\nx `a<b` **y**\n| k | v |\n|---|---|\n| a \\| b | 3.5 [1, 2] |\n"
                                 "| <i>c</i> | n/a |\n\n![missing](nope.png)\n", tmp_path, {})
    assert toc == [("a-b", "A &amp; B")]
    assert "<p>x <code>a&lt;b</code> <strong>y</strong></p>" in body
    assert "<td>a | b</td><td class=num>3.5 [1, 2]</td>" in body and "<td>&lt;i&gt;c&lt;/i&gt;</td>" in body
    assert "missing image: nope.png" in body and "<img" not in body


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={cwd / 'profile'}", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


PROBE = """<script>
window.addEventListener("load", function () {
  function header(t, text) {
    return Array.from(t.tHead.rows[0].cells).find(function (h) { return h.textContent.trim() === text; }); }
  function table(text) { return Array.from(document.querySelectorAll("table.sortable"))
    .find(function (t) { return header(t, text); }); }
  function sorted(t, text, col) {
    header(t, text).click();
    return Array.from(t.tBodies[0].rows).map(function (r) { return r.cells[col].textContent.trim(); });
  }
  var arms = table("top-1 last (Δ CE)"), gen = table("FID [95% CI]");
  var out = {images: document.images.length,
             decoded: Array.from(document.images).filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
             acc_up: sorted(arms, "top-1 last (Δ CE)", 0), acc_down: sorted(arms, "top-1 last (Δ CE)", 0),
             arm_up: sorted(arms, "arm", 0), fid_up: sorted(gen, "FID [95% CI]", 0), few_up: sorted(gen, "FID few", 0),
             few_down: sorted(gen, "FID few", 0), sort_state: arms.tHead.rows[0].cells[0].getAttribute("aria-sort")};
  var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@requires_chromium
def test_chromium_renders_the_report(report, tmp_path):
    _, outputs, md, page = report
    view = tmp_path / "copy"  # render a copy far from the run folder: nothing may be fetched from beside it
    view.mkdir()
    shutil.copy(page, view / "report.html")
    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", (view / "report.html").as_uri(), cwd=tmp_path)
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    non_white = (pixels.min(axis=2) < 235).mean()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and 0.05 < non_white < 0.95, non_white

    dom = _chromium("--dump-dom", (view / "report.html").as_uri(), cwd=tmp_path).stdout
    headings = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h[23][^>]*>(.*?)</h[23]>", dom)]
    for section in SECTIONS:
        assert section in headings, section
    assert len(re.findall(r"<img\b[^>]*src=\"data:image/png;base64,", dom)) == len(_markdown_images(md.read_text()))
    for name in outputs["classify"]:
        assert f'alt="{name} confusion matrix"' in dom


@requires_chromium
def test_chromium_sorts_tables_numerically(report, tmp_path):
    _, _, _, page = report
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "\n</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), cwd=tmp_path).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, flags=re.S)
    assert found, dom[-2000:]
    out = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert out["images"] == out["decoded"] == IMAGES
    assert out["acc_up"] == ["syn-ddpm", "ce", "syn-cbdm", "rs"]  # 9.50 < 79.00 < 80.00 < 100.00 (text: 100 < 79 < 80 < 9.5)
    assert out["acc_down"] == ["rs", "syn-cbdm", "ce", "syn-ddpm"]
    assert out["arm_up"] == ["ce", "rs", "syn-cbdm", "syn-ddpm"] and out["sort_state"] == "ascending"
    assert out["fid_up"] == ["ddpm", "cbdm"]  # 9.50 [8.60, 10.30] < 12.30 [...]: the first number decides
    assert out["few_up"] == ["cbdm", "ddpm"] and out["few_down"] == ["cbdm", "ddpm"]  # n/a stays last
