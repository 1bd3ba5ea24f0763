"""Config: presets, dotted overrides, coercion and validation with actionable messages."""
import argparse

import pytest

from pipeline.config import (Config, ModelConfig, add_config_arguments, build_config, from_dict,
                             list_presets, to_yaml, validate)
from pipeline.utils import PipelineError


def parse(argv, aliases=None):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, aliases or {"--max-steps": "train.max_steps",
                                             "--model": "model.model"})
    return parser.parse_args(argv)


def test_defaults_are_the_seed_design():
    m = ModelConfig()
    assert m.widths == [64, 128, 256, 512] and m.latent_channels == 512
    assert m.latent_side == 4


def test_dotted_and_alias_overrides_are_coerced():
    cfg = build_config(None, parse(["--max-steps", "7", "--model", "vqvae",
                                    "--model.widths", "16,32,64,128",
                                    "--model.latent_channels", "128",
                                    "--optim.betas", "0.5 0.9", "--train.compile", "true"]))
    assert cfg.train.max_steps == 7 and cfg.model.model == "vqvae"
    assert cfg.model.widths == [16, 32, 64, 128]
    assert cfg.optim.betas == (0.5, 0.9) and cfg.train.compile is True


def test_unknown_field_lists_valid_ones():
    with pytest.raises(PipelineError, match="unknown field.*bogus.*valid fields"):
        from_dict(Config, {"model": {"bogus": 1}})


@pytest.mark.parametrize("override, message", [
    ({"model": {"model": "gan"}}, "unknown --model 'gan'"),
    ({"model": {"arch": "vit"}}, "unknown --arch 'vit'"),
    ({"model": {"widths": [8, 8, 8, 8, 8, 8, 8]}}, "latent side would be 0.5"),
    ({"model": {"arch": "resnet", "downsample": 3}}, "does not fit 64px"),
    ({"model": {"arch": "resnet", "downsample": 8, "channel_mult": [1, 2]}}, "needs 4"),
    ({"model": {"latent_channels": 64}}, "basic AE's latent is its last encoder width"),
    ({"train": {"mixed_precision": "fp8"}}, "choose no, bf16 or fp16"),
    ({"train": {"max_steps": 0}}, "max_steps must be >= 1"),
])
def test_bad_configs_are_refused_with_a_hint(override, message):
    with pytest.raises(PipelineError, match=message):
        validate(from_dict(Config, override))


def test_bad_value_type_names_the_field():
    with pytest.raises(PipelineError, match=r"config.train.max_steps expects int"):
        from_dict(Config, {"train": {"max_steps": "many"}})


def test_yaml_round_trip():
    import yaml

    cfg = from_dict(Config, {"model": {"model": "vae", "latent_channels": 512}})
    again = from_dict(Config, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_missing_preset_lists_available():
    with pytest.raises(PipelineError, match="neither a YAML file nor a preset"):
        build_config("no-such-preset", parse([]))
    assert isinstance(list_presets(), list)


def test_every_config_option_has_help_text():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, {})
    options = [a for a in parser._actions if a.dest.count(".") == 1]
    assert len(options) > 50
    for action in options:
        assert not action.help.startswith("(default"), f"{action.dest} has no help text"
