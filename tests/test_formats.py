"""The export-format registry: one entry per format holds its writer and its loader."""
import json

import pytest

from compress.errors import CompressError
from compress.formats import EXPORT_MARKER, FORMATS, ExportFormat, format_of, get_format, register_format


def test_every_format_has_a_writer_and_a_loader(tmp_path):
    import compress.recipe  # noqa: F401  (the schema registers every step and format, self-spec's too)
    assert set(FORMATS) == {"hf", "gptq", "compressed-tensors", "self-spec"}
    for name in ("hf", "gptq", "compressed-tensors"):
        fmt = FORMATS[name]
        assert fmt.write.resolve().__name__.startswith("write_") and fmt.load.resolve().__name__.startswith("load_")
    assert FORMATS["self-spec"].write.resolve().__name__ == "write_self_spec"
    with pytest.raises(CompressError, match="a self-spec drafter export: exit heads for a target, not a model"):
        FORMATS["self-spec"].load(str(tmp_path), dtype=None, device="cpu")


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
