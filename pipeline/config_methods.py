"""Config sections of the long-tail methods (models/cbdm.py, models/oc.py, models/diffrop.py)
and `method_options`, the models-side knobs built from them;
re-exported by pipeline/config.py."""
from __future__ import annotations

from dataclasses import dataclass

from models.methods import MethodOptions


@dataclass(frozen=True)
class CBDMConfig:
    """CBDM (models/cbdm.py): w_t = tau·t/T; label_set train | balanced | sqrt; |𝒴| = num_labels."""

    tau: float = 1.0
    gamma: float = 0.25
    label_set: str = "train"
    num_labels: int = 1
    batched: bool = True  # the y and y′ forwards as one batch


@dataclass(frozen=True)
class OCConfig:
    """OC target transfer (models/oc.py); the mode comes from the method name (t2h/h2t/oc_full)."""

    beta: float = 0.0  # q(y)^β-weighted selection, Eq. 7
    cutoff: int = 1000  # transfer only for t < cutoff
    batch_resample: bool = False  # class-balanced batches (resample.mode=balanced_batch) for OC methods


@dataclass(frozen=True)
class DiffROPConfig:
    """DiffROP (models/diffrop.py): form neg_l2 | hinge | reciprocal | exponential."""

    form: str = "reciprocal"
    tau0: float = 0.01
    temperature: float = 1.0
    margin: float = 1.0
    group_size: int = 8


@dataclass(frozen=True)
class ReweightConfig:
    power: float = 1.0  # loss weight ∝ n_c^−power


def method_options(cfg) -> MethodOptions:
    """The models-side knobs of every method, from the config's method sections."""
    c, o, d, r = cfg.cbdm, cfg.oc, cfg.diffrop, cfg.reweight
    return MethodOptions(
        cbdm_tau=c.tau, cbdm_gamma=c.gamma, cbdm_label_set=c.label_set, cbdm_num_labels=c.num_labels,
        cbdm_batched=c.batched, oc_beta=o.beta, oc_cutoff=o.cutoff, diffrop_form=d.form, diffrop_tau0=d.tau0,
        diffrop_temperature=d.temperature, diffrop_margin=d.margin, diffrop_group_size=d.group_size,
        reweight_power=r.power)
