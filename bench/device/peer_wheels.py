"""The wheels GPTQModel (the peer in bench/quant_quality.py and scale_window.sh) needs on the GPU machine.

    python bench/device/peer_wheels.py [--gptqmodel 7.6.0] [--out .whl-peer] [--cache .whl-cache/peer]

GPTQModel is published as an sdist only. Its setup.py (7.6.0) builds no extension: the C++/CUDA kernels
under ``gptqmodel_ext`` are compiled just in time, when a backend that needs one is chosen, and its
torch/triton kernels need none. So ``pip wheel`` here gives a pure ``py3-none-any`` wheel, checked
(``is_pure``) before it is carried. Its requirements are then walked from the wheels' own metadata as
bench/device/vllm_wheels.py walks vLLM's (``closure``), against the GPU image
(``gpu_image_packages.txt``) plus what ``prepare.sh`` carries anyway (``gpu_wheels.txt``, into ``.whl/``).
A requirement with no cp312 wheel on the registry is built here from its sdist: a pure result is carried
as a wheel; a compiled one (PyPcre: a C extension over libpcre2-8) cannot be built here for Python 3.12
(this machine has 3.11 and no 3.12 headers), so its sdist is carried and ``gpu_setup.sh install`` builds
it there (gcc is there for nvcc; it needs Python.h and libpcre2-8 there too). OUT holds exactly what one
call carries, and ``closure.json`` (each file, its size, who needs it) goes beside the cache.
Runs here only (needs ``packaging`` and the registry).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).parent))
import vllm_wheels as vw  # noqa: E402  (wheel metadata, image list, download, the requirement walk)

HERE = Path(__file__).parent
LIMIT = vw.CHUNK  # one carry folder, under 60 MB beside the working tree
# Requirements left to the image although the requirement says otherwise (the GPU-side check lists them):
KEEP_IMAGE = {
    # gptqmodel pins numpy==2.2.6 for Python < 3.14; carrying it would put 2.2.6 first on PYTHONPATH for torch,
    # transformers and the toolkit's own rows too, which the image runs with its numpy (2.5.2).
    "numpy": "gptqmodel's exact pin (2.2.6) is not carried: the image's numpy serves every row alike",
    # A Rust build front-end (for building PyPcre from source); nothing in gptqmodel imports it.
    "maturin": "a build tool, not imported at run time",
}


class PeerError(SystemExit):
    """A wheel that cannot be carried as it is; a SystemExit so the command line stops naming it."""


def is_pure(wheel: Path) -> bool:
    """True when ``wheel`` installs on any CPython 3 (tag pyN-none-any, purelib root, no compiled module)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next((n for n in names if n.endswith(".dist-info/WHEEL")), None)
        if info is None:
            raise PeerError(f"{wheel.name}: no .dist-info/WHEEL in it")
        fields = [line.split(":", 1) for line in zf.read(info).decode().splitlines() if ":" in line]
    tags = [v.strip() for k, v in fields if k.strip() == "Tag"]
    purelib = any(k.strip() == "Root-Is-Purelib" and v.strip().lower() == "true" for k, v in fields)
    compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib")) or ".so." in n]
    any_tag = bool(tags) and all(t.split("-")[0].startswith("py") and t.split("-")[1:] == ["none", "any"]
                                 for t in tags)
    return purelib and any_tag and not compiled


def _pip_one(args: list[str], dest: Path, pattern: str, what: str) -> Path:
    """Run ``pip ARGS TMP`` (ARGS end with the folder flag's name), expect one ``pattern`` file there, move
    it into ``dest``; its path."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", *args[:-1], args[-1], tmp], capture_output=True, text=True)
        found = list(Path(tmp).glob(pattern))
        if proc.returncode or len(found) != 1:
            raise PeerError(f"{what} failed:\n{proc.stderr.strip()[-800:]}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / found[0].name
        shutil.move(str(found[0]), out)
        return out


def build_wheel(spec: str, dest: Path) -> Path:
    """``pip wheel --no-deps`` of ``spec`` from its sdist into ``dest``; the built wheel's path."""
    return _pip_one(["wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-binary", Requirement(spec).name,
                     spec, "-w"], dest, "*.whl", f"pip wheel {spec!r}")


def download_sdist(spec: str, dest: Path) -> Path:
    return _pip_one(["download", "-q", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
                     "--no-build-isolation", spec, "-d"], dest, "*.tar.gz", f"pip download (sdist) {spec!r}")


class Fetcher:
    """``closure``'s fetch: a cp312 wheel from the registry, else one built here from the sdist.

    A built wheel that is not pure is still returned (its metadata is what the walk reads), and its
    sdist is recorded in ``sdists`` (package key -> sdist path): that is what gets carried instead."""

    def __init__(self, download=vw.download, build=build_wheel, sdist=download_sdist):
        self.download, self.build, self.sdist = download, build, sdist
        self.sdists: dict[str, Path] = {}

    def __call__(self, spec: str, cache: Path) -> Path:
        try:
            return self.download(spec, cache)
        except vw.DownloadError:
            pass
        built = self.build(spec, cache / "built")
        if not is_pure(built):
            name, version, _ = vw.wheel_metadata(built)
            self.sdists[canonicalize_name(name)] = self.sdist(f"{name}=={version}", cache / "sdist")
        return built


def carry_list(carried: dict[str, dict], cache: Path, sdists: dict[str, Path]) -> list[tuple[str, Path, int]]:
    """(package, file to carry, bytes) for each carried package: its wheel, or its sdist where built there."""
    out = []
    for key, w in sorted(carried.items()):
        path = sdists.get(key)
        if path is None:
            path = next((p for p in (cache / w["wheel"], cache / "built" / w["wheel"]) if p.exists()), None)
            if path is None:
                raise PeerError(f"{key}: {w['wheel']} is in neither {cache} nor {cache / 'built'}")
        out.append((key, path, path.stat().st_size))
    return out


def write_carry(what: str, head: dict, carried: dict[str, dict], left: dict[str, dict], fetch: Fetcher,
                out: Path, cache: Path) -> dict:
    """Put exactly what one call carries into ``out`` (each carried package's wheel, or its sdist where it is
    built there), write ``cache/closure.json`` (``head`` first) and print the list; the report.

    Shared by the peer (GPTQModel) and lm-eval (bench/device/lm_eval_stage.py): one carry folder each."""
    files = carry_list(carried, cache, fetch.sdists)
    total = sum(size for _, _, size in files)
    if total > LIMIT:
        raise PeerError(f"{what}: the wheels come to {total / 1e6:.1f} MB, over one call's {LIMIT / 1e6:.1f} MB: "
                        "split them (vllm_wheels.py pack) before carrying")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for _, path, _ in files:
        shutil.copyfile(path, out / path.name)
    report = {**head, "bytes": total,
              "carried": {k: {**carried[k], "file": p.name, "bytes": s, "build_there": k in fetch.sdists}
                          for k, p, s in files},
              "left_to_image": dict(sorted(left.items()))}
    (cache / "closure.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{what}: {len(files)} files to carry in {out}/, {total / 1e6:.1f} MB "
          f"({len(fetch.sdists)} sdist(s) built there: {', '.join(sorted(fetch.sdists)) or 'none'})")
    for key, path, size in sorted(files, key=lambda f: -f[2]):
        print(f"  {size / 1e6:8.2f} MB  {path.name}")
    for key, v in sorted(left.items()):
        if not v["verified"]:
            print(f"  left to the image: {v['requirement']}" + (f"  ({v['kept']})" if "kept" in v else ""))
    return report


def image_and_carried() -> dict[str, str | None]:
    """What the GPU machine has before a carry folder of ours: the image, plus .whl/ (gpu_wheels.txt)."""
    return {**vw.image_packages(), **vw.image_packages(HERE / "gpu_wheels.txt")}


def resolve(version: str, out: Path, cache: Path) -> dict:
    root = build_wheel(f"gptqmodel=={version}", cache / "built")
    if not is_pure(root):
        raise PeerError(f"{root.name}: not a pure py3-none-any wheel (did its setup.py build an extension?); "
                        "it would not install on the GPU machine's Python 3.12")
    fetch = Fetcher()
    carried, left = vw.closure(root, cache, image_and_carried(), keep_image=KEEP_IMAGE, fetch=fetch)
    return write_carry(f"gptqmodel {version}", {"gptqmodel": version}, carried, left, fetch, out, cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peer_wheels.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptqmodel", default="7.6.0")
    ap.add_argument("--out", default=".whl-peer")
    ap.add_argument("--cache", default=".whl-cache/peer")
    args = ap.parse_args(argv)
    resolve(args.gptqmodel, Path(args.out), Path(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
