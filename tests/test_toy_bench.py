"""The papers' claims on the toy long-tail bench (models/toy/bench.py), with margin over seeds.

Each claim compares a method with DDPM trained for the same steps on the same data draws and
sampled from the same per-sample noise (ω = 0: the bench measures the learnt conditional
distributions, which guidance would sharpen), over three seeds; a claim holds when it holds at
every seed. Claims that did not reproduce here are marked xfail(strict) with the measured numbers,
so they are neither weakened nor silently dropped, and a fix that makes them hold shows up.
"""
import numpy as np
import pytest
import torch

from models.toy.bench import ToyData, ToyRun, run_methods, toy_run, train_toy

DATA = ToyData()
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def results():
    methods = ("ddpm", "cbdm", "t2h", "diffrop")
    runs = iter(run_methods([(m, toy_run(m), s) for m in methods for s in SEEDS], DATA))
    return {m: [next(runs) for _ in SEEDS] for m in methods}


def _values(results, method, key):
    return np.array([r[key] for r in results[method]])


def test_ddpm_leaks_tail_samples_into_the_head(results):
    """The premise of every paper: the rare classes' samples land in their frequent neighbours' region
    more often than the head classes' samples land in theirs."""
    tail = _values(results, "ddpm", "tail_leakage")
    head = np.array([np.mean([r["leakage"][c] for c in (0, 1, 2)]) for r in results["ddpm"]])
    assert (tail > head + 0.03).all(), (tail, head)


def test_diffrop_reduces_class_overlap(results):
    """DiffROP's claim (§5.1): pushing classes' predictions apart lowers the overlap between classes."""
    ddpm, other = _values(results, "ddpm", "overlap"), _values(results, "diffrop", "overlap")
    assert (other < ddpm).all() and (ddpm - other).mean() > 0.01, (other, ddpm)


def test_diffrc_pair_loss_makes_tail_samples_more_diverse():
    """DiffRC's claim (§3.2, Table 4): the pair-wise loss L_pair keeps the target's tail samples as varied as
    the source's relations among them, so they spread wider than the same target trained without it
    (λ = 0: the same source, the same steps, the same balanced batches, the same sampling noise).
    The conditional backbone (`diffrc_cfg`): the paper's unconditional `diffrc` gets its class only from
    the prototype guidance, which the toy bench does not train, so its per-class samples mean nothing here."""
    lams = (0.5, 0.0)
    runs = iter(run_methods([("diffrc_cfg", ToyRun(options={"diffrc": {"lam": lam}}), s) for lam in lams for s in SEEDS],
                            DATA))
    spread = {lam: np.array([next(runs)["tail_spread"] for _ in SEEDS]) for lam in lams}
    with_pair, without = spread[0.5], spread[0.0]
    assert (with_pair > without).all() and (with_pair - without).mean() > 0.03, (with_pair, without)


@pytest.mark.xfail(strict=True, reason="did not reproduce on the toy bench: at 600 steps, seeds 0-2, CBDM's "
                   "tail leakage is 0.30-0.33 and T2H's (cutoff 20) 0.22-0.29 against DDPM's 0.12-0.15; both spread "
                   "the tail wider (1.2-1.5x the true spread) instead of keeping it in its region")
@pytest.mark.parametrize("method", ["cbdm", "t2h"])
def test_cbdm_and_t2h_reduce_tail_leakage(results, method):
    ddpm, other = _values(results, "ddpm", "tail_leakage"), _values(results, method, "tail_leakage")
    assert (other < ddpm).all(), (method, other, ddpm)


@pytest.mark.parametrize("method, options", [("cbdm", {"cbdm": {"tau": 0.0}}), ("t2h", {"oc": {"cutoff": 0}}),
                                             ("diffrop", {"diffrop": {"tau0": 0.0}})])
def test_switched_off_methods_train_exactly_ddpm(method, options):
    short = ToyRun(steps=60, options=options)
    a, _, _, _ = train_toy(method, DATA, short, seed=5)
    b, _, _, _ = train_toy("ddpm", DATA, ToyRun(steps=60), seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), (method, name)
