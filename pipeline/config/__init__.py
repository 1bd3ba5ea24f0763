"""Typed configuration: nested dataclasses <- YAML preset <- command-line overrides.

`fields`: the machinery every stage's config uses (declared ranges, coercion, options,
validation); `model`: the model section, per component, with the catalogue of model,
family and quantiser names; `sections`: the training config. Torch-free (`pipeline
prepare` imports it). Public names stay importable from here.
"""
from .fields import (Bounds, FieldValueError, OptionName, Rule, add_config_arguments,
                     build_config, config_fields, current_names, element_type, field_problem,
                     field_problems, flat_aliases, flat_flag, format_value, from_dict,
                     get_dotted, list_presets, load_preset, mark_required, merge, opt,
                     renamed_options, require_declared, sections, set_dotted, to_yaml,
                     undeclared_fields, unwrap_optional, validate)
from .model import (ARCH_PARTS, MODEL_PARTS, QUANTIZER_PARTS, Part, parts_of, preset_for,
                    weight_fields)
from .sections import (ALIASES, ARCHS, MODELS, QUANTIZERS, SAMPLINGS, SEED_MAX, Config,
                       DataConfig, DiscConfig, LossConfig, ModelConfig, OptimConfig,
                       TrackerConfig, TrainConfig)

__all__ = ["ALIASES", "ARCHS", "ARCH_PARTS", "Bounds", "Config", "DataConfig", "DiscConfig",
           "FieldValueError", "LossConfig", "MODELS", "MODEL_PARTS", "ModelConfig",
           "OptimConfig", "OptionName", "Part", "QUANTIZERS", "QUANTIZER_PARTS", "Rule",
           "SAMPLINGS", "SEED_MAX", "TrackerConfig", "TrainConfig", "add_config_arguments",
           "build_config", "config_fields", "current_names", "element_type", "field_problem",
           "field_problems", "flat_aliases", "flat_flag", "format_value", "from_dict",
           "get_dotted", "list_presets", "load_preset", "mark_required", "merge", "opt",
           "parts_of", "preset_for", "renamed_options",
           "require_declared", "sections", "set_dotted", "to_yaml", "undeclared_fields",
           "unwrap_optional", "validate", "weight_fields"]
