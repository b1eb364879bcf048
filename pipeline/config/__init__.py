"""Run configuration: the schema (frozen dataclasses per section, method sections from the method
registry), loading (YAML presets and `--set key=value` overrides) and validation.

    from pipeline.config import Config, load_config, config_from_dict
"""
from pipeline.config.classify import ClassifyConfig
from pipeline.config.loading import assign_key, config_from_dict, load_config
from pipeline.config.schema import (DEFAULT_CONFIG, REPO_ROOT, SAMPLE_PLANS, STAGES, Config, DataConfig, EvalConfig,
                                    ModelConfig, ResampleConfig, SampleConfig, TrainConfig, config_hash, stable_hash)

__all__ = ["ClassifyConfig", "Config", "DataConfig", "DEFAULT_CONFIG", "EvalConfig", "ModelConfig", "REPO_ROOT",
           "ResampleConfig", "SAMPLE_PLANS", "SampleConfig", "STAGES", "TrainConfig", "assign_key",
           "config_from_dict", "config_hash", "load_config", "stable_hash"]
