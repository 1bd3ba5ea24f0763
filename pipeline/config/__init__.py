"""Typed configuration: nested dataclasses <- YAML preset <- command-line overrides.

`fields`: the machinery every stage's config uses (declared ranges, coercion, options,
validation); `sections`: the training config. Public names stay importable from here.
"""
from .fields import (Bounds, FieldValueError, OptionName, Rule, add_config_arguments,
                     build_config, config_fields, element_type, field_problem, field_problems,
                     from_dict, get_dotted, list_presets, load_preset, merge, opt,
                     require_declared, sections, set_dotted, to_yaml, undeclared_fields,
                     unwrap_optional, validate)
from .sections import (ALIASES, ARCHS, MODELS, QUANTIZERS, SAMPLINGS, SEED_MAX, Config,
                       DataConfig, LossConfig, ModelConfig, OptimConfig, TrackerConfig,
                       TrainConfig)

__all__ = ["ALIASES", "ARCHS", "Bounds", "Config", "DataConfig", "FieldValueError", "LossConfig",
           "MODELS", "ModelConfig", "OptimConfig", "OptionName", "QUANTIZERS", "Rule",
           "SAMPLINGS", "SEED_MAX", "TrackerConfig", "TrainConfig", "add_config_arguments",
           "build_config", "config_fields", "element_type", "field_problem", "field_problems",
           "from_dict", "get_dotted", "list_presets", "load_preset", "merge", "opt",
           "require_declared", "sections", "set_dotted", "to_yaml", "undeclared_fields",
           "unwrap_optional", "validate"]
