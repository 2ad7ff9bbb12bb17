"""Streaming (model.stream): the same export as the in-memory run, bit for bit, from a sharded
folder; resuming an interrupted run; refusals of what needs the whole model, at validate time."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from compress.errors import CompressError, RecipeError
from compress.formats.packed import read_tensors
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.plan import check_plan
from compress.recipe import validate_recipe
from compress.stream import work_dir_for
from compress.stream_run import run_streaming
from tests.tiny import byte_tokenizer, tiny_model


def _interrupt(after):
    """An ``on_block`` that stops the run as a crash would, once block ``after[1]`` of pass ``after[0]`` is written."""
    def on_block(pass_index, i):
        if (pass_index, i) == after:
            raise KeyboardInterrupt(f"interrupted after block {i} of pass {pass_index} (test)")
    return on_block

Q = {"bits": 4, "group_size": 32, "sym": True}
RECIPES = {
    "gptq": [{"algorithm": "gptq", **Q}],
    "rtn": [{"algorithm": "rtn", **Q}],
    "gptq+adaquant": [{"algorithm": "gptq", **Q}, {"algorithm": "adaquant", "steps": 2}],
    "rtn+bias_correction": [{"algorithm": "rtn", **Q},
                            {"algorithm": "bias_correction", "targets": [r"re:self_attn\.[qkv]_proj$"]}],
    "gptq_mixed": [{"algorithm": "gptq_mixed", "candidate_bits": [4, 8], "target_bits": 6.0, "group_size": 32,
                    "sym": True, "sensitivity": "layer_error"}],
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny llama saved in many shards (a tensor or two each), as a large checkpoint is."""
    path = tmp_path_factory.mktemp("src")
    model, tok = tiny_model("llama"), byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(path, max_shard_size="300KB")
    tok.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


def _recipe(model_dir, steps, stream=None):
    model = {"id": str(model_dir), "device": "cpu"} | ({"stream": stream} if stream is not None else {})
    return {"model": model, "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 2},
            "stages": [{"name": "q", "steps": steps}], "export": {"format": "gptq"}}


def _same_export(a, b):
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for f in ("config.json", "quantize_config.json"):
        assert (a / f).read_text() == (b / f).read_text(), f


@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_export_is_the_in_memory_one(sharded, tmp_path, name):
    mem = run_recipe(_recipe(sharded, RECIPES[name]), out_dir=tmp_path / "mem", progress=False, log=lambda *_: None)
    streamed = run_recipe(_recipe(sharded, RECIPES[name], True), out_dir=tmp_path / "st", progress=False,
                          log=lambda *_: None)
    _same_export(tmp_path / "mem", tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert not work_dir_for(tmp_path / "st").exists()  # the work folder goes once the export is in place
    # the same per-module reports as the in-memory run (errors, tokens, ...)
    for sm, ss in zip(mem.report["stages"][0]["steps"], streamed.report["stages"][0]["steps"]):
        assert sm["modules"] == ss["modules"]
    if name == "gptq":  # our loader reads the shards: the same model as the in-memory export's
        a = load_model(str(tmp_path / "mem"), progress=False).model
        b = load_model(str(tmp_path / "st"), progress=False).model
        ids = torch.arange(20)[None]
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("name,k", [("gptq", 1), ("gptq+adaquant", 0), ("gptq+adaquant", 1)])
def test_interrupted_run_resumes_at_the_first_block_not_written(sharded, tmp_path, name, k):
    """Interrupted after block k (of 3) of the last pass (adaquant k=0: the second pass's first block);
    started again it replays the written blocks and the export equals an uninterrupted run's."""
    run_recipe(_recipe(sharded, RECIPES[name], True), out_dir=tmp_path / "ref", progress=False, log=lambda *_: None)
    recipe = validate_recipe(_recipe(sharded, RECIPES[name], True))
    passes = len(RECIPES[name])
    with pytest.raises(KeyboardInterrupt):
        run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None,
                      on_block=_interrupt((passes - 1, k)))
    work = work_dir_for(tmp_path / "out")
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["finished"] == [passes - 1] * (k + 1) + [passes - 2] * (2 - k)
    assert not (tmp_path / "out").exists()  # no half export
    logs = []
    result = run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=logs.append)
    assert any("resuming" in line for line in logs) and result.report["stream"]["resumed"]
    _same_export(tmp_path / "ref", tmp_path / "out")


def test_without_resume_an_interrupted_run_starts_over(sharded, tmp_path):
    steps = RECIPES["gptq"]
    run_recipe(_recipe(sharded, steps, True), out_dir=tmp_path / "ref", progress=False, log=lambda *_: None)
    recipe = validate_recipe(_recipe(sharded, steps, {"resume": False}))
    with pytest.raises(KeyboardInterrupt):
        run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None,
                      on_block=_interrupt((0, 1)))
    assert not list((work_dir_for(tmp_path / "out") / "blocks").glob("*.safetensors"))  # only packed shards
    result = run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    assert not result.report["stream"]["resumed"]
    seconds = result.report["stream"]["seconds"]  # the blocks' reads and writes, timed apart from the solves
    assert set(seconds) == {"read", "write"} and seconds["read"] > 0 and seconds["write"] > 0
    _same_export(tmp_path / "ref", tmp_path / "out")


def test_a_changed_recipe_does_not_resume_the_old_work(sharded, tmp_path):
    recipe = validate_recipe(_recipe(sharded, RECIPES["gptq"], True))
    with pytest.raises(KeyboardInterrupt):
        run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None,
                      on_block=_interrupt((0, 0)))
    other = validate_recipe(_recipe(sharded, [{"algorithm": "gptq", **Q, "damp": 0.05}], True))
    result = run_streaming(other, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    assert not result.report["stream"]["resumed"]
    shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("change,expect", [
    ({"steps": [{"algorithm": "nirvana", "sparsity": 0.3}]}, "nirvana needs the whole model"),
    ({"steps": [{"algorithm": "rotate"}, {"algorithm": "gptq", **Q}]}, "rotate needs the whole model"),
    ({"steps": [{"algorithm": "s2ft", "task": "lm", "corpus": "bbc", "steps": 2}]}, "s2ft needs the whole model"),
    ({"steps": [{"algorithm": "gptq", **Q}, {"algorithm": "recalibrate", "method": "temperature"}]},
     "recalibrate needs the whole model"),
    ({"steps": [{"algorithm": "gptq_mixed", "candidate_bits": [4, 8], "target_bits": 6.0, "sensitivity": "loss"}]},
     "sensitivity loss"),
    ({"steps": [{"algorithm": "gptq", **Q, "asymmetric": True}]}, "asymmetric \\(GPTAQ\\)"),
    ({"export": {"format": "hf"}}, "use export.format gptq"),
    ({"verify": {"max_windows": 2}}, "compress eval"),
    ({"calibration": {"strategy": "diversity"}}, "strategy random or domain"),
])
def test_what_needs_the_whole_model_is_refused_at_validate_time(sharded, change, expect):
    recipe = _recipe(sharded, change.pop("steps", RECIPES["gptq"]), True) | change
    with pytest.raises(RecipeError, match=expect):
        check_plan(validate_recipe(recipe))  # no structure, no model: what `compress validate` runs first


def test_stream_needs_an_output_folder(sharded):
    with pytest.raises(CompressError, match="output folder"):
        run_recipe(_recipe(sharded, RECIPES["gptq"], True), progress=False)


def test_stream_shorthand_and_schema():
    r = validate_recipe({"model": {"id": "smollm2-135m", "stream": True}, "stages": []})
    assert r.model.stream is not None and r.model.stream.resume
    assert validate_recipe({"model": {"id": "smollm2-135m", "stream": False}}).model.stream is None
    with pytest.raises(RecipeError, match="model.stream"):
        validate_recipe({"model": {"id": "smollm2-135m", "stream": {"resume": True, "bogus": 1}}})


def test_smollm2_streamed_from_the_zoo_folder_equals_in_memory(tmp_path):
    """The real model, as the zoo converts it from GGUF (one model.safetensors, tied embeddings),
    W4 g128 GPTQ (576 inputs: a partial last group) on a few calibration windows. Three of the 30
    blocks are quantized (all 30 are read, replayed and written): the other blocks' linears stay
    float, which the export's config must say (dynamic rules), and the test stays quick."""
    steps = [{"algorithm": "gptq", "bits": 4, "group_size": 128, "sym": True,
              "targets": [r"re:^model\.layers\.(0|1|29)\."]}]
    recipe = {"model": {"id": "smollm2-135m", "device": "cpu"},
              "calibration": {"num_samples": 2, "seq_len": 64, "batch_size": 2},
              "stages": [{"name": "q", "steps": steps}], "export": {"format": "gptq"}}
    run_recipe(recipe, out_dir=tmp_path / "mem", progress=False, log=lambda *_: None)
    recipe["model"]["stream"] = True
    run_recipe(recipe, out_dir=tmp_path / "st", progress=False, log=lambda *_: None)
    _same_export(tmp_path / "mem", tmp_path / "st")


DENSE = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("arch", DENSE)
def test_streamed_equals_in_memory_across_architectures(arch, tmp_path):
    """The coverage table's dense architectures (tests/tiny_archs.py): gemma's sliding and global
    layers (per-block masks), qwen3's q/k norms, phi3's fused projections."""
    from tests.tiny_archs import arch_model_dir

    src = arch_model_dir(tmp_path / "src", arch)
    steps = [{"algorithm": "gptq", "bits": 4, "group_size": 32, "sym": True}]
    run_recipe(_recipe(src, steps), out_dir=tmp_path / "mem", progress=False, log=lambda *_: None)
    run_recipe(_recipe(src, steps, True), out_dir=tmp_path / "st", progress=False, log=lambda *_: None)
    _same_export(tmp_path / "mem", tmp_path / "st")


def _moe_recipe(src, stream=None, **calibration):
    recipe = _recipe(src, RECIPES["gptq"], stream)
    recipe["calibration"].update(calibration)
    return recipe


def _same_reports(mem, streamed):
    """The same per-module reports and tokens per expert (routed counts, all-token experts)."""
    for sm, ss in zip(mem.report["stages"][0]["steps"], streamed.report["stages"][0]["steps"]):
        assert sm["modules"] == ss["modules"]
        assert sm["experts"] == ss["experts"] and set(ss["experts"]) == {f"model.layers.{i}.mlp.experts"
                                                                         for i in range(2)}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_streamed_mixture_of_experts_equals_in_memory(arch, tmp_path):
    """Experts split into per-expert linears on the skeleton and read expert by expert from a sharded
    checkpoint in transformers 5's saved layout (mixtral: block_sparse_moe.experts.E.w1/w3/w2, renamed
    on load; qwen: mlp.experts.E.gate/up/down_proj): the in-memory export, bit for bit, and its reports."""
    from compress.structure import model_structure
    from tests.tiny_archs import arch_model_dir

    src = arch_model_dir(tmp_path / "src", arch, max_shard_size="100KB")
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 3
    structure, _ = model_structure(src)  # what `compress validate` checks, from the config alone
    check_plan(validate_recipe(_moe_recipe(src, True)), structure)
    mem = run_recipe(_moe_recipe(src), out_dir=tmp_path / "mem", progress=False, log=lambda *_: None)
    st = run_recipe(_moe_recipe(src, True), out_dir=tmp_path / "st", progress=False, log=lambda *_: None)
    _same_export(tmp_path / "mem", tmp_path / "st")
    _same_reports(mem, st)
    assert "model.layers.1.mlp.experts.3.down_proj.qweight" in read_tensors(tmp_path / "st")


def test_fused_expert_tensors_are_read_one_expert_at_a_time(tmp_path):
    """A checkpoint that stores the experts fused (experts.gate_up_proj [E, 2I, H], down_proj
    [E, H, I]: the module's own layout) streams to the export of the per-expert checkpoint of the same
    weights loaded whole; every token through every expert (routing all) reported the same."""
    from safetensors.torch import save_file

    from tests.tiny_archs import arch_model, arch_model_dir

    src = arch_model_dir(tmp_path / "src", "qwen2_moe")
    fused = tmp_path / "fused"
    shutil.copytree(src, fused, ignore=shutil.ignore_patterns("*.safetensors"))  # config and tokenizer
    tensors = {k: v.contiguous() for k, v in arch_model("qwen2_moe").state_dict().items()}  # the same seed
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    mem = run_recipe(_moe_recipe(src, expert_routing="all"), out_dir=tmp_path / "mem", progress=False,
                     log=lambda *_: None)
    st = run_recipe(_moe_recipe(fused, True, expert_routing="all"), out_dir=tmp_path / "st", progress=False,
                    log=lambda *_: None)
    _same_export(tmp_path / "mem", tmp_path / "st")
    _same_reports(mem, st)
    assert st.report["stages"][0]["steps"][0]["experts"]["model.layers.0.mlp.experts"]["all_token_statistics"] \
        == [0, 1, 2, 3]


def test_an_expert_the_checkpoint_lacks_is_named(tmp_path):
    """A layout streaming cannot map onto the split experts (here: a fused tensor missing) stops at the
    block, naming the per-expert tensor it looked for and what to do."""
    from safetensors.torch import save_file

    from tests.tiny_archs import arch_model, arch_model_dir

    src = arch_model_dir(tmp_path / "src", "qwen3_moe")
    fused = tmp_path / "fused"
    shutil.copytree(src, fused, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {k: v.contiguous() for k, v in arch_model("qwen3_moe").state_dict().items()
               if k != "model.layers.1.mlp.experts.down_proj"}
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"no tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight'.*"
                                            r"drop model\.stream"):
        run_recipe(_moe_recipe(fused, True), out_dir=tmp_path / "st", progress=False, log=lambda *_: None)


def test_interrupted_mixture_of_experts_resumes_with_its_tokens_per_expert(tmp_path):
    """Interrupted after block 0 of 2, started again: block 0 is replayed (not solved) and its tokens
    per expert come from the manifest; the export and the report are the uninterrupted run's."""
    from tests.tiny_archs import arch_model_dir

    src = arch_model_dir(tmp_path / "src", "mixtral", max_shard_size="100KB")
    recipe = validate_recipe(_moe_recipe(src, True, expert_min_tokens=40))  # some experts take every token
    ref = run_streaming(recipe, out_dir=tmp_path / "ref", progress=False, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None,
                      on_block=_interrupt((0, 0)))
    manifest = json.loads((work_dir_for(tmp_path / "out") / "manifest.json").read_text())
    assert manifest["finished"] == [0, -1] and list(manifest["experts"]["0"]) == ["0"]
    result = run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    assert result.report["stream"]["resumed"]
    _same_export(tmp_path / "ref", tmp_path / "out")
    _same_reports(ref, result)
    starved = [r["all_token_statistics"] for r in ref.report["stages"][0]["steps"][0]["experts"].values()]
    assert any(starved)  # the threshold took effect, so the restored report carries it



def _mapped(folder) -> set[str]:
    """The names of the files in ``folder`` this process has mapped (Linux: /proc/self/maps)."""
    root = str(folder.resolve()) + "/"
    fields = (line.split(maxsplit=5) for line in open("/proc/self/maps"))
    return {f[5].strip()[len(root):] for f in fields if len(f) == 6 and f[5].startswith(root)}


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_streamed_run_unmaps_the_shards_of_the_blocks_it_has_finished(sharded, tmp_path):
    """safe_open maps a shard, and every page a read touched stays resident while the map lives: a run
    that kept its shards open grew by the whole checkpoint (the 8B shape's host peak on the H200). At
    block i's end no shard that holds only earlier blocks may still be mapped (on the CPU the live
    block's and the embeddings' tensors are views of their shards, so those stay)."""
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    blocks_of = {}
    for name, shard in weight_map.items():
        parts = name.split(".")
        blocks_of.setdefault(shard, set()).add(int(parts[2]) if parts[1] == "layers" else None)
    recipe = validate_recipe(_recipe(sharded, RECIPES["gptq"], True))
    stale = []
    def on_block(_pass, i):
        done = {s for s, b in blocks_of.items() if None not in b and max(b) < i}
        stale.append((i, sorted(_mapped(sharded) & done)))
    run_streaming(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None, on_block=on_block)
    assert len(stale) == 3 and all(not s for _, s in stale), f"finished blocks' shards still mapped: {stale}"


@pytest.mark.parametrize("slice_elements", [5, 1 << 24])
def test_streamed_safetensors_writer_gives_save_files_bytes(tmp_path, monkeypatch, slice_elements):
    """The first shard of a streamed export is written a tensor and a slice at a time: the same bytes as
    safetensors' own save_file (order, header, padding), for every dtype, a scalar and slices that do not
    divide the tensor; each tensor's ``after_each`` runs once it is written."""
    from safetensors.torch import save_file

    import compress.formats.safetensors_stream as st

    monkeypatch.setattr(st, "_SLICE", slice_elements)
    g = torch.Generator().manual_seed(0)
    tensors = {"emb": torch.randn(13, 7, generator=g).to(torch.bfloat16), "norm": torch.randn(7, generator=g),
               "ids": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(4, dtype=torch.uint8), "scale": torch.randn((), generator=g).half(), "mask": torch.tensor([True, False]),
               "a.b": torch.randn(3, 2, generator=g).to(torch.float16)}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    done = []
    size = st.save_file_streamed(tmp_path / "ours.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                                 lambda k: tensors[k], metadata={"format": "pt"}, after_each=lambda: done.append(1))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert size == sum(t.numel() * t.element_size() for t in tensors.values()) and len(done) == len(tensors)


def test_streamed_safetensors_writer_converts_per_slice_and_refuses_a_wrong_shape(tmp_path):
    import compress.formats.safetensors_stream as st
    from safetensors.torch import load_file

    w = torch.randn(9, 4, dtype=torch.float32)
    st.save_file_streamed(tmp_path / "a.safetensors", [("w", torch.float16, (9, 4))], lambda k: w,
                          convert=lambda part, to: part.to(torch.bfloat16).to(to))
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["w"], w.to(torch.bfloat16).to(torch.float16))
    with pytest.raises(ValueError, match=r"w: read a tensor of shape \(4, 9\)"):
        st.save_file_streamed(tmp_path / "b.safetensors", [("w", torch.float16, (9, 4))], lambda k: w.T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_streamed_run_keeps_the_embedding_on_the_gpu_and_exports_the_in_memory_model(sharded, tmp_path):
    """On a GPU the parameters outside the blocks live on the GPU for the whole streamed run (the host never
    holds the embedding); the export is still the in-memory run's on the same GPU."""
    def on_cuda(steps, stream=None):
        r = _recipe(sharded, steps, stream)
        r["model"]["device"] = "cuda"
        return r

    mem = run_recipe(on_cuda(RECIPES["gptq"]), out_dir=tmp_path / "mem", progress=False, log=lambda *_: None)
    streamed = run_recipe(on_cuda(RECIPES["gptq"], True), out_dir=tmp_path / "st", progress=False,
                          log=lambda *_: None)
    assert streamed.model.get_input_embeddings().weight.device.type == "cuda"
    _same_export(tmp_path / "mem", tmp_path / "st")
    assert mem.report["stages"][0]["steps"][0]["modules"] == streamed.report["stages"][0]["steps"][0]["modules"]
