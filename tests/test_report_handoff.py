"""The report's Hand-off section (`--latents`, `--export`): what it shows from the files
encode and export write, and crafted files refused by name. (The demo's test builds one
from real encode/export outputs and runs its loading example.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.layout import EXPORT_RECORD_NAME, LATENT_FORMAT
from pipeline.report import main as report_main
from pipeline.report.handoff import (LOADING_EXAMPLE, handoff_section, read_export,
                                     read_latent_set)
from pipeline.utils import PipelineError
from reportgen import make_comparison


def latent_manifest(**overrides) -> dict:
    manifest = {"format": LATENT_FORMAT, "split": "val", "num_samples": 40,
                "latent": {"kind": "moments", "member": "moments.npy", "shape": [8, 16, 16],
                           "dtype": "float16"},
                "scaling_factor": 0.64, "shift_factor": -0.25,
                "checkpoint": {"path": "/runs/vae/model", "step": 40}}
    manifest.update(overrides)
    return manifest


def export_record(**overrides) -> dict:
    record = {"format": "diffusers", "class": "AutoencoderKL", "scaling_factor": 0.64,
              "shift_factor": -0.25, "checkpoint": {"path": "/runs/vae/model", "step": 40},
              "check": {"differences": {"encode": 1e-7, "decode": 3e-7}}}
    record.update(overrides)
    return record


def write_json(directory: Path, name: str, value) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(value))
    return directory


def test_section_lists_both_and_the_loading_example_names_their_paths(tmp_path):
    latents = read_latent_set(str(write_json(tmp_path / "lat" / "val", "manifest.json",
                                             latent_manifest())))
    export = read_export(str(write_json(tmp_path / "exp", EXPORT_RECORD_NAME, export_record())))
    section = handoff_section([latents], [export])
    latent_table, export_table = section.blocks[1], section.blocks[2]
    assert latent_table.rows == [[str(tmp_path / "lat" / "val"), "moments", "8×16×16",
                                  "float16", "40", "0.64", "-0.25", "/runs/vae/model", "40"]]
    assert export_table.rows == [[str(tmp_path / "exp"), "AutoencoderKL", "0.64", "-0.25",
                                  "/runs/vae/model", "40", "3e-07"]]
    example = section.blocks[-1].text
    assert f'AutoencoderKL.from_pretrained("{tmp_path / "exp"}")' in example
    assert f'make_train_loader("{tmp_path / "lat" / "val"}"' in example


def test_codes_without_an_autoencoder_kl_get_no_diffusion_example(tmp_path):
    codes = latent_manifest(latent={"kind": "codes", "member": "codes.npy", "shape": [16, 16],
                                    "dtype": "uint16"}, scaling_factor=None, shift_factor=None)
    latents = read_latent_set(str(write_json(tmp_path / "val", "manifest.json", codes)))
    section = handoff_section([latents], [])
    assert [type(b).__name__ for b in section.blocks] == ["Text", "Table"]
    assert section.blocks[1].rows[0][1:7] == ["codes", "16×16", "uint16", "40", "—", "—"]


@pytest.mark.parametrize("manifest,message", [
    (None, "no manifest.json in it"),
    ({"format": "ae-pipeline-shards/1", "num_samples": 3}, "is not a manifest of `pipeline encode`"),
    (latent_manifest(latent={"kind": "moments", "shape": [8, -1], "dtype": "float16"}),
     "no sound 'latent' section"),
    (latent_manifest(latent="moments"), "no sound 'latent' section"),
    ([1, 2], "is not a manifest of `pipeline encode`"),
])
def test_crafted_latent_manifests_are_refused_by_name(tmp_path, manifest, message):
    split = tmp_path / "val"
    split.mkdir()
    if manifest is not None:
        write_json(split, "manifest.json", manifest)
    with pytest.raises(PipelineError, match=f"--latents {split}: .*{message}"):
        read_latent_set(str(split))


def test_crafted_values_are_shown_only_when_they_have_their_type(tmp_path):
    crafted = latent_manifest(num_samples="many", scaling_factor=True,
                              checkpoint={"path": ["x"], "step": "40"})
    latents = read_latent_set(str(write_json(tmp_path / "val", "manifest.json", crafted)))
    assert (latents.num_samples, latents.scaling_factor, latents.checkpoint, latents.step) == \
        (0, None, "—", None)


@pytest.mark.parametrize("record,message", [
    (None, "no export.json in it"),
    (export_record(scaling_factor="0.6"), "has no 'class' and 'scaling_factor'"),
    ({"class": 3, "scaling_factor": 1.0}, "has no 'class' and 'scaling_factor'"),
])
def test_crafted_export_records_are_refused_by_name(tmp_path, record, message):
    directory = tmp_path / "exp"
    directory.mkdir()
    if record is not None:
        write_json(directory, EXPORT_RECORD_NAME, record)
    with pytest.raises(PipelineError, match=f"--export {directory}: .*{message}"):
        read_export(str(directory))


def test_report_cli_adds_the_section_before_the_details(tmp_path, capsys):
    made = make_comparison(tmp_path)
    split = write_json(tmp_path / "lat" / "val", "manifest.json", latent_manifest())
    export = write_json(tmp_path / "exp", EXPORT_RECORD_NAME, export_record())
    assert report_main([str(made["eval"]), "--output", str(tmp_path / "report"),
                        "--latents", str(split), "--export", str(export)]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.index("## Hand-off") < markdown.index("## Checkpoint details")
    assert str(split) in markdown and str(export) in markdown
    assert report_main([str(made["eval"]), "--output", str(tmp_path / "plain")]) == 0
    assert "Hand-off" not in (tmp_path / "plain" / "report.md").read_text()


def test_readme_shows_the_same_loading_example():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert LOADING_EXAMPLE.format(export="exports/kl-f4", latents="latents/train") in readme
