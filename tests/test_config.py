"""Config presets, overrides and the one-line errors for bad keys and values."""
import json
from pathlib import Path

import pytest

from pipeline.config import Config, config_hash, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["fmnist_lt", "digits_lt", "cifar10_lt", "cifar100_lt", "paper"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert isinstance(cfg, Config) and cfg.name == {"paper": "paper_cifar10_lt"}.get(preset, preset)
    json.dumps(cfg.to_dict())  # serialisable as written into the run folder


def test_default_is_fashion_mnist_lt():
    cfg = load_config(None)
    assert (cfg.data.dataset, cfg.data.profile, cfg.data.imb_factor) == ("fashion-mnist", "exp", 0.01)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["data.imb_factor=0.02", "data.class_order=[9,8,7,6,5,4,3,2,1,0]",
                             "resample.mode=sqrt", "stages=data", "data.data_root=/x/y"])
    assert cfg.data.imb_factor == 0.02 and cfg.data.class_order == tuple(range(9, -1, -1))
    assert cfg.resample.mode == "sqrt" and cfg.stages == ("data",) and cfg.data.data_root == "/x/y"


def test_hash_tracks_content():
    a, b = load_config(None), load_config(None, ["data.imb_factor=0.02"])
    assert config_hash(a.data) == config_hash(load_config(None).data) != config_hash(b.data)


@pytest.mark.parametrize("override, message", [
    ("data.imbfactor=0.1", "unknown config key data.imbfactor (did you mean data.imb_factor?)"),
    ("trian.steps=3", "unknown config key trian"),
    ("data.imb_factor=1.5", "outside (0, 1]"),
    ("data.imb_factor=0", "outside (0, 1]"),
    ("data.dataset=mnist-ish", "unknown dataset 'mnist-ish'"),
    ("data.profile=linear", "unknown imbalance profile 'linear'"),
    ("resample.mode=fancy", "unknown resample mode 'fancy'"),
    ("data.seed=abc", "data.seed must be an integer"),
    ("stages=data,paint", "unknown stage(s) paint"),
    ("data.on_corrupt=ignore", "use fail or skip"),
    ("sample.guidance_norm=max", "use rms (unit RMS per image) or l2"),
    ("sample.omega_by_method={ddmp: 3}", "sample.omega_by_method: unknown method 'ddmp'"),
    ("sample.omega_by_method={ddpm: -1}", "give a mapping of method to ω >= 0"),
    ("noequals", "--set expects key=value"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: pass --config configs/"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_method_sections_come_from_the_registry():
    """Each method's options dataclass is its config section: --set reaches it, validation is its own."""
    from models.methods.registry import sections

    cfg = load_config(None, ["cbdm.tau=0.5", "diffrop.form=hinge"])
    assert set(sections()) <= set(cfg.to_dict()) and cfg.cbdm.tau == 0.5 and cfg.diffrop.form == "hinge"
    assert type(cfg.cbdm) is sections()["cbdm"]
    with pytest.raises(ConfigError, match="cbdm.label_set"):
        load_config(None, ["train.methods=[cbdm]", "cbdm.label_set=bogus"])
    with pytest.raises(ConfigError, match="did you mean cbdm.tau"):
        load_config(None, ["cbdm.tua=1"])


def test_a_method_can_sample_at_its_own_omega():
    """sample.omega_by_method (method -> ω) wins over sample.omega for the methods it names; the
    table stays hashable, survives config.json, and an explicit ω (a study's, classify.omega, a
    swept sample.omega) holds for every method."""
    import dataclasses

    from pipeline.config import config_from_dict
    from pipeline.stages.s5_classify import augmentation_config
    from pipeline.tuning.space import SearchSpace, point_config

    cfg = load_config(None, ["sample.omega=2", "sample.omega_by_method={ddpm: 3, cbdm+diffrop: 0.5}"])
    s = cfg.sample
    assert s.omega_by_method == (("cbdm+diffrop", 0.5), ("ddpm", 3)) and hash(cfg)
    assert (s.omega_for("ddpm"), s.omega_for("rs"), s.omega_for("cbdm+diffrop")) == (3.0, 2.0, 0.5)
    assert s.for_method("ddpm") == dataclasses.replace(s, omega=3.0, omega_by_method=())
    assert s.omega_label() == "2 (cbdm+diffrop 0.5, ddpm 3)"
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))  # what a worker or a rerun reads back
    assert again.sample == s and hash(again)
    one = load_config(None, ["sample.omega_by_method={ddpm: 3}", "sample.omega_by_method.rs=1.5"])
    assert one.sample.omega_by_method == (("ddpm", 3), ("rs", 1.5))
    # the augmentation images sample at each method's own ω unless classify.omega / a study's ω is given
    assert augmentation_config(cfg).sample.omega_for("ddpm") == 3.0
    assert augmentation_config(cfg, omega=1.0).sample.omega_for("ddpm") == 1.0
    fixed = dataclasses.replace(cfg, classify=dataclasses.replace(cfg.classify, omega=0.0))
    assert augmentation_config(fixed).sample.omega_for("ddpm") == 0.0
    space = SearchSpace(name="w", method="ddpm", kind="sample", space={"sample.omega": {"grid": [1.0]}})
    assert point_config(cfg, space, {"sample.omega": 1.0}).sample.omega_for("ddpm") == 1.0
