"""The generation cache (compress/draft/selfspec/generation_cache.py): keyed on everything greedy_fill's
tokens depend on, read back only when whole."""
import torch

from compress.draft.selfspec.generation_cache import generation_key, load_generations, save_generations
from tests.tiny import tiny_model


def _prompts():
    return [torch.tensor([5, 6, 7]), torch.tensor([9, 10])]


def test_the_key_changes_with_every_input_and_only_with_them():
    model = tiny_model("llama")
    base = generation_key(model, _prompts(), 16, 4)
    assert base == generation_key(model, [p.clone() for p in _prompts()], 16, 4)
    others = [generation_key(model, [torch.tensor([5, 6, 8]), torch.tensor([9, 10])], 16, 4),
              generation_key(model, [torch.tensor([5, 6]), torch.tensor([7, 9, 10])], 16, 4),  # same ids, split apart
              generation_key(model, _prompts(), 17, 4),
              generation_key(model, _prompts(), 16, 2),
              generation_key(model, _prompts(), 16, 4, pad_id=1),
              generation_key(model.to(torch.bfloat16), _prompts(), 16, 4),
              generation_key(tiny_model("llama", seed=1), _prompts(), 16, 4)]
    assert len({base, *others}) == 1 + len(others)


def test_saved_generations_read_back_and_bad_files_are_ignored(tmp_path):
    seqs = torch.randint(0, 300, (3, 8))
    lens = torch.tensor([2, 3, 5])
    assert load_generations("k", 3, 8, tmp_path) is None
    path = save_generations("k", seqs, lens, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"] and path.name == "k.safetensors"
    got = load_generations("k", 3, 8, tmp_path)
    assert got[0].dtype == torch.long and torch.equal(got[0], seqs) and torch.equal(got[1], lens)
    assert load_generations("k", 4, 8, tmp_path) is None  # other shapes than asked: not these
    path.write_bytes(b"not a safetensors file")
    assert load_generations("k", 3, 8, tmp_path) is None
