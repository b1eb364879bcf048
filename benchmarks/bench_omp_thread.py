"""torch in a non-main thread, with and without a 2-thread OpenMP region run earlier on the main
thread. Ray Train runs the train function in a thread of the worker process; this isolates the
effect without Ray. Each variant runs in a fresh interpreter (libgomp's pools live per process),
twice, interleaved; prints the rates and the ratio of their medians, measured in this one run.

    python benchmarks/bench_omp_thread.py [--steps 40] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
from models.classify.lt_losses import RECIPES, ClassifierLoss, EpochSchedule
from models.classify.resnet import resnet32
from models.classify.training import classifier_step, make_classifier_state

steps, touch = int(sys.argv[2]), sys.argv[3] == "touch"
torch.set_num_threads(2)
if touch:  # one parallel op on the main thread, as a worker's set-up may do
    torch.randn(1_000_000).mul_(2)
out = {}

def rate():
    torch.set_num_threads(2)
    state = make_classifier_state(resnet32(10, 1), 0.1, 0.9, 2e-4, seed=0, input_size=28)
    loss_fn = ClassifierLoss(RECIPES["ce"], [6000, 60] + [100] * 8, EpochSchedule.scaled(3, 0.1))
    x = torch.randint(0, 256, (128, 28, 28, 1), dtype=torch.uint8)
    y = torch.randint(0, 10, (128,))
    for i in range(3 + steps):
        if i == 3:
            start = time.perf_counter()
        loss = classifier_step(state, x, y, loss_fn, 0, True, True)
    loss.item()
    out["rate"] = steps * 128 / (time.perf_counter() - start)

t = threading.Thread(target=rate)
t.start()
t.join()
print(json.dumps(out))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"clean": [], "touch": []}
    for _ in range(args.repeats):
        for variant in rates:
            res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(args.steps), variant],
                                 capture_output=True, text=True, check=True)
            rates[variant].append(json.loads(res.stdout.strip().splitlines()[-1])["rate"])
    for variant, values in rates.items():
        label = "main thread idle" if variant == "clean" else "main thread ran one 2-thread op"
        print(f"ResNet-32 step in a thread, {label:32s}: " + ", ".join(f"{v:.0f}" for v in values) + " img/s")
    ratio = statistics.median(rates["clean"]) / statistics.median(rates["touch"])
    print(f"clean / touched: {ratio:.2f}x")
    print(json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()} | {"ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
