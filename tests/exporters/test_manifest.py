"""The one reader of effideploy_export.json."""

import pytest

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import MANIFEST_FILE, read_export_manifest


def test_a_folder_without_a_manifest_is_not_an_export(tmp_path):
    assert read_export_manifest(tmp_path) is None
    assert read_export_manifest(tmp_path / "missing") is None


def test_a_manifest_is_read_as_a_dict(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text('{"runtime": "onnx", "source": {"path": "/x"}}')
    assert read_export_manifest(tmp_path) == {"runtime": "onnx", "source": {"path": "/x"}}


@pytest.mark.parametrize("text, fragment", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold an object")])
def test_a_broken_manifest_is_a_one_line_error(tmp_path, text, fragment):
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(EffideployError, match=fragment) as error:
        read_export_manifest(tmp_path)
    assert "\n" not in str(error.value)
