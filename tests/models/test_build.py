"""The one tokenizer loader: a ModelSource or a folder, never remote code, one-line errors."""

import shutil

import pytest

from effideploy.errors import EffideployError
from effideploy.models.build import load_tokenizer
from effideploy.models.resolve import resolve_model


def test_a_source_and_its_folder_give_the_same_tokenizer(tiny_model_dir):
    text = "The history of the city begins"
    from_folder = load_tokenizer(tiny_model_dir)(text).input_ids
    assert from_folder and load_tokenizer(resolve_model(tiny_model_dir))(text).input_ids == from_folder
    assert load_tokenizer(str(tiny_model_dir))(text).input_ids == from_folder


def test_a_pruned_checkpoints_auto_map_is_not_followed(tiny_model_dir, tmp_path):
    """A config with an auto_map whose code is absent: the tokenizer loads without it (and without asking)."""
    import json

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_missing.MissingConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder)("the city").input_ids


def test_a_folder_without_a_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(EffideployError, match="cannot load a tokenizer from") as error:
        load_tokenizer(tmp_path)
    assert "\n" not in str(error.value)
