"""Shared test set-up."""
import pytest
import torch

from tests.tiny import TEXT


@pytest.fixture(autouse=True)
def _tiny_ops_on_one_thread(request):
    """Tiny-model tests are all small ops: on a shared 2-core box intra-op threads only wait on each
    other (one module took 50 s with two threads and 1 s with one). Real-model tests (marked slow)
    keep every thread."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_file(tmp_path):
    """A small local corpus file (the tiny models' TEXT) for recipes' calibration and verify."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(autouse=True)
def _caches_per_test(tmp_path_factory, monkeypatch):
    """run_recipe caches verify's float baseline across runs (compress/baseline_cache.py), the self_spec
    step the target's continuations (generation_cache.py): each test gets empty caches of its own, so no
    test reads another's and none writes to the user's."""
    import compress.baseline_cache
    import compress.draft.selfspec.generation_cache
    folder = tmp_path_factory.mktemp("baselines")
    monkeypatch.setattr(compress.baseline_cache, "cache_dir", lambda *_: folder)
    generations = tmp_path_factory.mktemp("generations")  # the self_spec step's continuations, the same way
    monkeypatch.setattr(compress.draft.selfspec.generation_cache, "cache_dir", lambda *_: generations)
