"""`run.py compare`: the paired table over the evaluate stage's files, its default baseline, and its
refusal of runs that were not evaluated."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import TaildiffError
from pipeline.stages.s4_evaluate import save_reference_stats
from pipeline.tools.compare import compare

C, PER_CLASS, DIM = 6, 30, 8
COUNTS = [600, 300, 150, 60, 30, 10]  # few = the two last classes


def _gaussian_set(rng, shift: float, labels: np.ndarray) -> np.ndarray:
    centres = np.eye(C, DIM) * 3.0
    return centres[labels] + shift + rng.normal(size=(len(labels), DIM))


def _write_run(tmp_path, name: str, methods: dict[str, float], seed_offset: int = 0, noise: int = 0):
    rng = np.random.default_rng(0)
    ref_labels = np.repeat(np.arange(C), 200)
    run = tmp_path / name
    (run / "evaluation").mkdir(parents=True)
    save_reference_stats({"reference_feats": _gaussian_set(rng, 0.0, ref_labels), "reference_labels": ref_labels},
                         COUNTS, run / "evaluation" / "reference_stats.npz")
    labels = np.tile(np.arange(C), PER_CLASS)
    k = np.repeat(np.arange(PER_CLASS), C)
    for method, shift in methods.items():
        folder = run / "evaluation" / method
        folder.mkdir()
        feats = _gaussian_set(np.random.default_rng(len(method) + 100 * noise), shift, labels)
        logits = np.eye(C)[labels] * (1.0 if shift < 1 else 0.0)  # a shifted set "fails" fidelity (argmax 0)
        order = np.random.default_rng(1).permutation(len(labels))  # files need not be in key order
        np.savez(folder / "features.npz", feats=feats[order], logits=logits[order], label=labels[order],
                 k=k[order], seed=(1000 + seed_offset + np.arange(len(labels)))[order])
    return run


def test_default_baseline_is_ddpm_and_a_large_shift_is_a_real_difference(tmp_path):
    run = _write_run(tmp_path, "r", {"cbdm": 2.0, "ddpm": 0.0})  # cbdm sorts first
    text = compare([run])
    assert "Paired against **ddpm**" in text
    cbdm = next(line for line in text.splitlines() if line.startswith("| cbdm |"))
    cells = [c.strip() for c in cbdm.strip("|").split("|")]
    assert cells[2].startswith("+") and cells[2].endswith("*")  # ΔFID > 0 with an interval excluding 0
    assert cells[6].startswith("-") and cells[6].endswith("*")  # fidelity lost


def test_runs_with_other_seeds_are_not_paired_and_baseline_can_be_named(tmp_path):
    a = _write_run(tmp_path, "a", {"ddpm": 0.0})
    b = _write_run(tmp_path, "b", {"cbdm": 0.0}, seed_offset=7)
    text = compare([a, b], baseline="cbdm")
    assert "Paired against **b:cbdm**" in text
    assert "not paired (other seeds)" in next(line for line in text.splitlines() if line.startswith("| a:ddpm |"))


def test_an_unevaluated_run_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaildiffError, match="run its evaluate stage first"):
        compare([tmp_path / "empty"])
    run = _write_run(tmp_path, "r", {"ddpm": 0.0})
    with pytest.raises(TaildiffError, match="not an evaluated method"):
        compare([run], baseline="t2h")


def test_diversity_column_is_paired_and_a_collapsed_set_is_less_diverse(tmp_path):
    run = _write_run(tmp_path, "r", {"ddpm": 0.0, "narrow": 0.0})
    path = run / "evaluation" / "narrow" / "features.npz"
    blob = dict(np.load(path))
    centres = np.eye(C, DIM) * 3.0
    blob["feats"] = centres[blob["label"]] + 0.2 * (blob["feats"] - centres[blob["label"]])  # 5× less spread
    np.savez(path, **blob)
    text = compare([run])
    assert "| diversity few | Δ diversity few |" in text
    narrow = next(line for line in text.splitlines() if line.startswith("| narrow |"))
    cells = [c.strip() for c in narrow.strip("|").split("|")]
    assert float(cells[7]) < 1.5 and cells[8].startswith("-") and cells[8].endswith("*")
    ddpm = next(line for line in text.splitlines() if line.startswith("| ddpm |"))
    assert float([c.strip() for c in ddpm.strip("|").split("|")][7]) == pytest.approx(4.0, rel=0.2)  # √(2·8)


def test_over_seeds_gives_a_t_interval_over_runs(tmp_path):
    """Three training seeds (other noise per run): CBDM's shift is a real ΔFID over runs, DDPM against
    itself has no row of differences; one run or runs on other references are refused in one line."""
    runs = [_write_run(tmp_path, f"s{i}", {"ddpm": 0.0, "cbdm": 2.0, "t2h": 0.0}, noise=i) for i in range(3)]
    text = compare(runs, over_seeds=True)
    assert "Over training seeds: 3 runs" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {"ddpm", "cbdm", "t2h"} and rows["ddpm"][3] == "—"
    assert rows["cbdm"][3].startswith("+") and "*" in rows["cbdm"][3] and rows["cbdm"][3].count("/") == 2
    assert "*" not in rows["t2h"][3]  # the same distribution as DDPM: no difference over seeds
    with pytest.raises(TaildiffError, match="two or more runs"):
        compare(runs[:1], over_seeds=True)
    other = _write_run(tmp_path, "other", {"ddpm": 0.0})
    blob = dict(np.load(other / "evaluation" / "reference_stats.npz"))
    blob["all_mu"] = blob["all_mu"] + 1.0
    np.savez(other / "evaluation" / "reference_stats.npz", **blob)
    with pytest.raises(TaildiffError, match="other reference statistics"):
        compare([runs[0], other], over_seeds=True)
