"""The bad-input catalogue as a table: each case is built in a fresh folder and run through the CLI
(`python pipeline/run.py`), and the row records the exit code, the error line and what the run
left in its output folder. The same cases are asserted in tests/test_bad_inputs.py (and the
faults in tests/test_cli.py, tests/test_faults.py); this script only prints them for a note.

    python scripts/bad_input_table.py            # markdown table on stdout (about 2 minutes)
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the small-file writers the tests use


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cases(tmp: Path):
    """(name, extra CLI args, marker file that must not appear or None)."""
    import torch

    from fakes import write_fake_cifar, write_fake_fmnist, write_imagefolder

    digits = ["--config", "configs/digits_lt.yaml"]
    yield "unknown key", [*digits, "--set", "tarin.steps=5"], None
    yield "misspelt key", [*digits, "--set", "train.stpes=5"], None
    yield "bad type", [*digits, "--set", "train.steps=abc"], None
    yield "steps 0", [*digits, "--set", "train.steps=0"], None
    yield "batch 0", [*digits, "--set", "train.batch_size=0"], None
    yield "imb_factor 0", [*digits, "--set", "data.imb_factor=0"], None
    yield "imb_factor 1.5", [*digits, "--set", "data.imb_factor=1.5"], None
    yield "unknown method", [*digits, "--set", "train.methods=[ddpm,magic]"], None
    yield "missing config", ["--config", str(tmp / "nope.yaml")], None
    (tmp / "bad.yaml").write_text("train: [steps\n")
    yield "malformed config", ["--config", str(tmp / "bad.yaml")], None
    folder = ["--set", "data.dataset=imagefolder", "--set", "data.imb_factor=null"]
    write_imagefolder(tmp / "corrupt", {"a": 4, "b": 3})
    (tmp / "corrupt" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    yield "ImageFolder: corrupt image", [*digits, *folder, "--set", f"data.data_root={tmp / 'corrupt'}"], None
    write_imagefolder(tmp / "empty", {"a": 4, "b": 3})
    (tmp / "empty" / "c").mkdir()
    yield "ImageFolder: empty class", [*digits, *folder, "--set", f"data.data_root={tmp / 'empty'}"], None
    write_imagefolder(tmp / "one", {"only": 5})
    yield "ImageFolder: one class", [*digits, *folder, "--set", f"data.data_root={tmp / 'one'}"], None
    write_imagefolder(tmp / "text", {"a": 4, "b": 3})
    (tmp / "text" / "a" / "notes.png").write_text("not an image")
    yield "ImageFolder: non-image file named .png", [*digits, *folder, "--set", f"data.data_root={tmp / 'text'}"], None
    write_fake_fmnist(tmp / "fm")
    gz = tmp / "fm" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    yield "truncated Fashion-MNIST .gz", ["--set", f"data.data_root={tmp / 'fm'}", "--set", "data.download=false"], None
    (tmp / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    yield "CIFAR folder without batches", ["--config", "configs/cifar10_lt.yaml", "--set",
                                           f"data.data_root={tmp / 'cifar'}", "--set", "data.download=false"], None
    write_fake_cifar(tmp / "evilcifar", "cifar10")
    cifar_marker = tmp / "cifar.ran"
    with open(tmp / "evilcifar" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": RunsCode(cifar_marker), "labels": [0]}, f, protocol=2)
    yield "CIFAR batch holding pickled code", ["--config", "configs/cifar10_lt.yaml", "--set",
                                               f"data.data_root={tmp / 'evilcifar'}", "--set", "data.download=false"], cifar_marker
    train = [*digits, "--set", "train.methods=[ddpm,cbdm]", "--stages", "train"]
    truncated = tmp / "truncated.pt"
    torch.save({"ema": {"w": torch.zeros(1000)}, "config": "{}"}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    yield "truncated checkpoint as init_from", [*train, "--set", f"train.init_from={truncated}"], None
    (tmp / "notes.pt").write_text("hello")
    yield "non-torch file as init_from", [*train, "--set", f"train.init_from={tmp / 'notes.pt'}"], None
    evil_marker = tmp / "evil.ran"
    torch.save({"ema": {}, "config": "{}", "payload": RunsCode(evil_marker)}, tmp / "evil.pt")
    yield "checkpoint holding pickled code as init_from", [*train, "--set", f"train.init_from={tmp / 'evil.pt'}"], evil_marker
    evil_weights = tmp / "evil_inception.pt"
    torch.save({"payload": RunsCode(tmp / "inception.ran")}, evil_weights)
    yield "Inception weights holding pickled code", [*digits, "--set", "evaluate.extractor=inception", "--set",
                                                     f"evaluate.weights_path={evil_weights}"], tmp / "inception.ran"


def leftovers(out: Path) -> str:
    if not out.exists():
        return "none (output folder not created)"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ", ".join(files) if files else "none (empty folders only)"


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, args, marker) in enumerate(cases(tmp)):
            out = tmp / f"out{i}"
            started = time.perf_counter()
            res = subprocess.run([sys.executable, str(REPO / "pipeline" / "run.py"), *args, "--set",
                                  f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            message = errors[-1][len("error: "):] if errors else f"(no error line; stderr tail: {res.stderr[-200:]!r})"
            ran = " — **code ran**" if marker is not None and marker.exists() else ""
            rows.append((name, res.returncode, message.replace(str(tmp), "<tmp>").replace("|", "\\|"),
                         leftovers(out).replace(str(tmp), "<tmp>") + ran, time.perf_counter() - started,
                         len(errors)))
    print("| case | exit | error lines | message | leftovers in output_dir | s |")
    print("|---|---|---|---|---|---|")
    for name, rc, message, left, seconds, n in rows:
        print(f"| {name} | {rc} | {n} | {message} | {left} | {seconds:.1f} |")
    return 0 if all(rc == 2 and n == 1 for _, rc, _, _, _, n in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
