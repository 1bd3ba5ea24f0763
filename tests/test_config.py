"""Config: presets, dotted overrides, coercion, and validation of every field against its
declared range (generically, over generated values) with actionable messages."""
import argparse
import dataclasses
import json
import math
import subprocess
import sys
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (ALIASES, ARCHS, MODELS, Bounds, Config, ModelConfig, Rule,
                             add_config_arguments, build_config, config_fields, element_type,
                             format_value, from_dict, get_dotted, list_presets, preset_for,
                             to_yaml, undeclared_fields, unwrap_optional, validate)
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
    ({"train": {"mixed_precision": "fp8"}},
     "unknown --mixed-precision 'fp8'; choose one of no, bf16, fp16"),
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


# ---------------------------------------------------------------- declared ranges, generically

CONTROL = [chr(c) for c in range(32)] + ["\x7f"]


def below(bounds: Bounds, integer: bool):
    if integer:
        return st.integers(max_value=int(bounds.low) - (0 if bounds.low_open else 1))
    if bounds.low == -math.inf:
        return st.just(-math.inf) if bounds.low_open else st.nothing()
    return st.floats(max_value=bounds.low, exclude_max=not bounds.low_open)


def above(bounds: Bounds, integer: bool):
    if bounds.high == math.inf:
        return st.just(math.inf) if bounds.high_open and not integer else st.nothing()
    if integer:
        return st.integers(min_value=int(bounds.high) + (0 if bounds.high_open else 1))
    return st.floats(min_value=bounds.high, exclude_min=not bounds.high_open)


def bad_scalars(hint, rule: Rule):
    """Values of one scalar (a field, or an element of a list field) outside its rule."""
    if hint is bool:
        return st.sampled_from(["maybe", "2", 2, -1, 0.5, "", "nope"])
    if hint in (int, float):
        integer = hint is int
        options = [st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer())
                   if integer else st.just(math.nan), st.just("many")]
        if rule.bounds is not None:
            options += [below(rule.bounds, integer), above(rule.bounds, integer)]
        if rule.choices is not None:
            options.append(st.integers().filter(lambda v: v not in rule.choices))
        return st.one_of(options)
    options = [st.tuples(st.text(max_size=5), st.sampled_from(CONTROL), st.text(max_size=5))
               .map("".join)]
    if rule.nonempty:
        options.append(st.just(""))
    if rule.choices is not None:
        options.append(st.text(max_size=12).filter(lambda v: v not in rule.choices))
    return st.one_of(options)


def good_scalars(hint, rule: Rule):
    """Values of one scalar inside its rule (to surround a bad element with)."""
    if rule.choices is not None:
        return st.sampled_from(rule.choices)
    if hint is str:
        return st.text(alphabet="abc", min_size=1, max_size=3)
    bounds = rule.bounds
    low = bounds.low if bounds.low != -math.inf else -1e6
    high = bounds.high if bounds.high != math.inf else 1e6
    if hint is int:
        return st.integers(int(low) + bounds.low_open, int(high) - bounds.high_open)
    return st.floats(low, high, exclude_min=bounds.low_open, exclude_max=bounds.high_open)


def out_of_range(hint, rule: Rule):
    """Every kind of value a field must refuse, from its declared rule and its type."""
    inner, optional = unwrap_optional(hint)
    options = [] if optional else [st.just(None)]
    container = typing.get_origin(inner)
    if container not in (list, tuple):
        bad = bad_scalars(inner, rule)
        return st.one_of(*options, bad, bad.filter(lambda v: isinstance(v, (int, float)))
                         .map(str))  # as typed on the command line
    elem = element_type(inner)
    elem_rule = Rule(rule.bounds, rule.choices, nonempty=elem is str)
    good, bad = good_scalars(elem, elem_rule), bad_scalars(elem, elem_rule)
    length = len(typing.get_args(inner)) if container is tuple else None
    valid = st.lists(good, min_size=length or 1, max_size=length or 4)
    # One bad value among valid ones: in place of one (a tuple keeps its length) or added.
    options.append(st.tuples(valid, bad, st.integers(0, 3)).map(
        lambda t: [*t[0][:t[2] % length], t[1], *t[0][t[2] % length + 1:]] if length else
        [*t[0][:t[2]], t[1], *t[0][t[2]:]]))
    if rule.nonempty:
        options.append(st.just([]))
    if length:
        options.append(st.lists(good, max_size=5).filter(lambda v: len(v) != length))
    return st.one_of(options)


FIELDS = [(dotted, f, hint) for dotted, f, hint in config_fields()]


def test_every_field_declares_its_range():
    assert undeclared_fields() == []
    for dotted, f, hint in FIELDS:
        assert isinstance(f.metadata["rule"], Rule), dotted


@pytest.mark.parametrize("dotted, field, hint", FIELDS, ids=[d for d, _, _ in FIELDS])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_field_refuses_values_outside_its_declared_range(dotted, field, hint, data):
    """For every field of every section (a new one included, untouched here): a value
    generated outside what it declares is refused by build_config, naming the option."""
    value = data.draw(out_of_range(hint, field.metadata["rule"]), label=dotted)
    section, name = dotted.split(".")
    with pytest.raises(PipelineError) as error:
        build_config(None, argparse.Namespace(), defaults={section: {name: value}})
    assert f"--{dotted}" in str(error.value), str(error.value)


def test_declared_ranges_accept_the_defaults_and_every_preset():
    validate(Config())
    for preset in list_presets():
        build_config(preset, parse([]))


@pytest.mark.parametrize("text, inside, outside", [
    ("[0, 1)", [0, 0.5, 0.999], [-0.001, 1, math.nan, math.inf]),
    ("(0, inf)", [1e-300, 5, 1e300], [0, -1, math.inf, math.nan]),
    ("[1, inf)", [1, 10**30], [0, 0.999, -math.inf]),
    ("(-inf, inf)", [-1e300, 0, 1e300], [math.inf, -math.inf, math.nan]),
])
def test_bounds_open_and_closed_ends(text, inside, outside):
    bounds = Bounds.parse(text)
    assert all(v in bounds for v in inside)
    assert not any(v in bounds for v in outside)


def test_range_messages_name_option_alias_and_range():
    args = parse(["--max-steps", "0"], aliases={"--max-steps": "train.max_steps"})
    with pytest.raises(PipelineError, match=r"^--train\.max_steps must be >= 1, got 0 "
                                            r"\(alias --max-steps\)$"):
        build_config(None, args, aliases={"--max-steps": "train.max_steps"})
    with pytest.raises(PipelineError, match=r"--optim\.betas needs exactly 2 values, got 3"):
        build_config(None, parse(["--optim.betas", "0.1 0.2 0.3"]))
    with pytest.raises(PipelineError, match=r"--model\.logvar_clamp \[5\.0, 1\.0\]: the minimum "
                                            r"must be below the maximum"):
        validate(from_dict(Config, {"model": {"logvar_clamp": [5, 1]}}))


# ---------------------------------------------------------------- list syntax

LIST_FIELDS = [(dotted, f, hint) for dotted, f, hint in FIELDS
               if typing.get_origin(unwrap_optional(hint)[0]) in (list, tuple)]


def shown_default(action) -> str:
    """The default as `--help` prints it: '... (default: [8, 8, 8, 6, 5]; >= 2)'."""
    text = action.help.replace("%%", "%")
    shown = text[text.rindex("(default: ") + len("(default: "):-1]
    return shown.split("; ")[0]


def test_every_list_default_as_help_shows_it_parses_back_to_the_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ALIASES)
    actions = {a.dest: a for a in parser._actions}
    assert {d for d, _, _ in LIST_FIELDS} >= {"model.fsq_levels", "model.widths",
                                              "optim.betas", "tracker.tags"}
    for dotted, f, _hint in LIST_FIELDS:
        shown = shown_default(actions[dotted])
        cfg = build_config(None, parser.parse_args([f"--{dotted}", shown]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert get_dotted(cfg, dotted) == default, (dotted, shown)
    assert shown_default(actions["model.fsq_levels"]) == "[8, 8, 8, 6, 5]"


@pytest.mark.parametrize("text", ["[8, 5, 5, 5]", "[8,5,5,5]", " [8, 5, 5, 5] ", "8,5,5,5",
                                  "8 5 5 5", "8, 5, 5, 5"])
def test_fsq_levels_accept_yaml_comma_and_space_lists(text):
    cfg = build_config(None, parse(["--model.fsq_levels", text]))
    assert cfg.model.fsq_levels == [8, 5, 5, 5]


def test_unfinished_list_is_refused_naming_the_option():
    with pytest.raises(PipelineError, match=r"^--model\.fsq_levels expects a list such as "
                                            r"\[8, 5, 5\] or 8,5,5, got '\[8, 5'$"):
        build_config(None, parse(["--model.fsq_levels", "[8, 5"]))


@pytest.mark.parametrize("dotted, field, hint", LIST_FIELDS, ids=[d for d, _, _ in LIST_FIELDS])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_lists_round_trip_through_every_written_form(dotted, field, hint, data):
    """Any valid list of a list field, written as --help writes it, with commas or with
    spaces, is read back as the same list (coercion only: cross-field rules aside)."""
    inner = unwrap_optional(hint)[0]
    elem, rule = element_type(inner), field.metadata["rule"]
    length = len(typing.get_args(inner)) if typing.get_origin(inner) is tuple else None
    good = good_scalars(elem, Rule(rule.bounds, rule.choices, nonempty=elem is str))
    values = data.draw(st.lists(good, min_size=length or 1, max_size=length or 6))
    expected = tuple(values) if length else values
    section, name = dotted.split(".")
    for text in (format_value(values), ",".join(map(str, values)), " ".join(map(str, values))):
        parsed = get_dotted(from_dict(Config, {section: {name: text}}), dotted)
        assert parsed == pytest.approx(expected) if elem is float else parsed == expected, text


# ---------------------------------------------------------------- renamed fields

def test_codebook_decay_is_read_under_its_old_name_everywhere(tmp_path):
    assert build_config(None, parse(["--model.ema_decay", "0.5"])).model.codebook_decay == 0.5
    preset = tmp_path / "old.yaml"
    preset.write_text("model:\n  model: vqvae\n  ema_decay: 0.8\n")
    assert build_config(str(preset), parse([])).model.codebook_decay == 0.8
    later = build_config(str(preset), parse(["--model.codebook_decay", "0.3"]))
    assert later.model.codebook_decay == 0.3  # the command line overrides either spelling
    assert from_dict(ModelConfig, {"ema_decay": 0.7}).codebook_decay == 0.7
    written = to_yaml(later)
    assert "codebook_decay: 0.3" in written and "ema_decay" not in written.split("optim:")[0]
    assert later.model.ema_decay == 0.3  # the old attribute name still reads it


def test_both_spellings_with_different_values_are_refused():
    with pytest.raises(PipelineError, match=r"config\.model sets both ema_decay and "
                                            r"codebook_decay .*keep only codebook_decay"):
        from_dict(Config, {"model": {"ema_decay": 0.7, "codebook_decay": 0.8}})
    same = from_dict(Config, {"model": {"ema_decay": 0.7, "codebook_decay": 0.7}})
    assert same.model.codebook_decay == 0.7


def test_codebook_decay_is_distinct_from_the_weight_ema_decay():
    cfg = build_config(None, parse(["--model.ema_decay", "0.5", "--optim.ema_decay", "0.9"]))
    assert (cfg.model.codebook_decay, cfg.optim.ema_decay) == (0.5, 0.9)
    assert build_config("vqvae", parse([])).model.codebook_decay == 0.99


# ---------------------------------------------------------------- the preset rule

def test_preset_rule_of_train_and_demo():
    assert preset_for("ae") == "ae" and preset_for("vae", "resnet") == "resnet-vae"
    assert preset_for("vqvae", "basic", prefix="demo") == "demo-vqvae"
    assert preset_for("vqvae", "resnet", prefix="demo") == "demo-vqvae"
    assert preset_for("ae", "resnet", prefix="no-such") == "resnet-ae"
    assert preset_for("gan", "basic") is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_declared_model_and_arch_has_its_preset(model, arch):
    name = preset_for(model, arch)
    assert name is not None, f"no preset for --model {model} --arch {arch}"
    cfg = build_config(name, parse([]))
    assert (cfg.model.model, cfg.model.arch) == (model, arch)


def test_config_imports_without_torch():
    """`pipeline prepare` and its forkserver workers import the config, never torch: the
    model names validation needs come from the torch-free catalogue."""
    code = ("import argparse, json, sys\n"
            "import pipeline.config as c\n"
            "c.build_config('vqvae', argparse.Namespace())\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'pipeline') and not m.startswith('pipeline.config'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout) == ["pipeline", "pipeline.utils"]
