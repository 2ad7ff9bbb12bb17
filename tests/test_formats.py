"""The export-format registry: one entry per format holds its writer and its loader."""
import json

import pytest

from compress.errors import CompressError
from compress.formats import EXPORT_MARKER, FORMATS, ExportFormat, format_of, get_format, register_format


def test_every_format_has_a_writer_and_a_loader():
    assert set(FORMATS) == {"hf", "gptq", "compressed-tensors"}
    for fmt in FORMATS.values():
        assert callable(fmt.write) and callable(fmt.load)
        assert fmt.write.resolve().__name__.startswith("write_") and fmt.load.resolve().__name__.startswith("load_")


def test_registering_a_format_twice_is_refused():
    with pytest.raises(ValueError, match="'gptq' registered twice"):
        register_format(ExportFormat("gptq", write=print, load=print))
    assert FORMATS["gptq"].write.name == "write_gptq"  # the first registration stands


def test_a_folder_names_its_format_and_plain_folders_load_as_hf(tmp_path):
    assert format_of(tmp_path).name == "hf"
    (tmp_path / EXPORT_MARKER).write_text(json.dumps({"format": "compressed-tensors"}))
    assert format_of(tmp_path).name == "compressed-tensors"
    (tmp_path / EXPORT_MARKER).write_text(json.dumps({"format": "gguf"}))
    with pytest.raises(CompressError, match="unknown export format 'gguf'; known: hf, gptq, compressed-tensors"):
        format_of(tmp_path)
    with pytest.raises(CompressError, match="unknown export format"):
        get_format("onnx")
