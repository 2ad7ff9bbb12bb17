"""GPTQModel's wheels for the GPU machine (bench/device/peer_wheels.py, vllm_wheels.closure, gpu_setup.sh
install): which wheels count as pure, which requirements are walked, carried, built there or left to the
image, and that a carried .whl-peer/ is installed and imported. Fake wheels only: no registry."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench/device"))
_spec = importlib.util.spec_from_file_location("peer_wheels", ROOT / "bench/device/peer_wheels.py")
pw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pw)
vw = pw.vw


def fake_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any", purelib=True,
               files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]]) + "\n\n"
    wheel = f"Wheel-Version: 1.0\nRoot-Is-Purelib: {str(purelib).lower()}\nTag: {tag}\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA", meta)
        zf.writestr(f"{info}/WHEEL", wheel)
        for n, text in (files or {f"{name}/__init__.py": ""}).items():
            zf.writestr(n, text)
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_is_pure_wants_an_any_tag_a_purelib_root_and_no_compiled_module(tmp_path):
    assert pw.is_pure(fake_wheel(tmp_path / "a", "p", "1"))
    assert not pw.is_pure(fake_wheel(tmp_path / "b", "p", "1", tag="cp311-cp311-linux_x86_64", purelib=False))
    assert not pw.is_pure(fake_wheel(tmp_path / "c", "p", "1", files={"p/_ext.cpython-311-x86_64-linux-gnu.so": ""}))
    assert not pw.is_pure(fake_wheel(tmp_path / "d", "p", "1", purelib=False))


def test_closure_carries_what_the_image_lacks_and_keeps_what_it_is_told(tmp_path):
    cache, pool = tmp_path / "cache", tmp_path / "pool"
    root = fake_wheel(tmp_path / "built", "peer", "7.6.0", requires=[
        "torch>=2.8", "numpy==2.2.6; python_version < '3.14'", "numpy>=2.3; python_version >= '3.14'",
        "dep>=1", "winonly; sys_platform == 'win32'", "pyarrow>=21", "protobuf==99.1", "regex>=1"])
    fake_wheel(pool, "dep", "1.2", requires=["leaf[x]", "torch>=99; extra == 'never'"])
    fake_wheel(pool, "leaf", "0.1", requires=["extra-need; extra == 'x'"])
    fake_wheel(pool, "extra_need", "3")
    fake_wheel(pool, "protobuf", "99.1")
    asked = []

    def fetch(spec, dest):
        asked.append(spec)
        name = spec.split(">")[0].split("=")[0].replace("-", "_")
        hit = next(pool.glob(f"{name}-*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(hit, dest / hit.name))

    image = {"torch": "2.11.0", "numpy": "2.5.2", "pyarrow": None, "protobuf": None, "regex": None}
    carried, left = vw.closure(root, cache, image, keep_image={"numpy": "the image's numpy"}, fetch=fetch)
    assert set(carried) == {"peer", "dep", "leaf", "extra-need", "protobuf"}
    assert carried["leaf"]["required_by"] == "dep==1.2" and carried["extra-need"]["required_by"] == "leaf==0.1"
    assert left["torch"]["verified"] and left["numpy"]["kept"] == "the image's numpy"
    assert left["pyarrow"] == {"requirement": "pyarrow>=21", "image": None, "verified": False}
    assert "winonly" not in carried and "winonly" not in left
    # an unknown image version is trusted for a range (regex), not for an exact pin (protobuf)
    assert not left["regex"]["verified"] and "protobuf" not in left
    assert asked == ["dep>=1", "protobuf==99.1", "leaf", "extra-need"]


def test_fetcher_builds_sdist_only_packages_and_carries_the_sdist_of_a_compiled_one(tmp_path):
    def no_wheel(spec, dest):
        raise vw.DownloadError(f"no wheel for {spec}")

    def build(spec, dest):
        name = spec.split(">")[0].split("=")[0]
        compiled = name == "pypcre"
        return fake_wheel(dest, name, "0.6.4", tag="cp311-cp311-linux_x86_64" if compiled else "py3-none-any",
                          purelib=not compiled)

    def sdist(spec, dest):
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / (spec.replace("==", "-") + ".tar.gz")
        out.write_bytes(b"sdist of " + spec.encode())
        return out

    cache = tmp_path / "cache"
    fetch = pw.Fetcher(download=no_wheel, build=build, sdist=sdist)
    logbar = fetch("logbar>=0.4", cache)
    pcre = fetch("pypcre>=0.6.2", cache)
    assert pw.is_pure(logbar) and not pw.is_pure(pcre)
    assert set(fetch.sdists) == {"pypcre"}
    carried = {"logbar": {"wheel": logbar.name}, "pypcre": {"wheel": pcre.name}}
    files = {k: p.name for k, p, _ in pw.carry_list(carried, cache, fetch.sdists)}
    assert files == {"logbar": logbar.name, "pypcre": "pypcre-0.6.4.tar.gz"}
    with pytest.raises(pw.PeerError, match="gone-0.1"):
        pw.carry_list({"gone": {"wheel": "gone-0.1-py3-none-any.whl"}}, cache, {})


needs_pip = pytest.mark.skipif(subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True).returncode != 0,
                               reason="gpu_setup.sh installs with python3 -m pip")


def _gpu_install(tmp_path, peer_init: str):
    """A GPU-side checkout with a fake gptqmodel wheel in .whl-peer/; a function that runs its install."""
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "bench/device", gpu / "bench/device")
    fake_wheel(gpu / ".whl-peer", "gptqmodel", "7.6.0", files={"gptqmodel/__init__.py": peer_init})
    env = {**os.environ, "SITE": str(tmp_path / "site"), "STAGE": str(tmp_path / "stage"),
           "COMPRESS_CACHE": str(tmp_path / "cache")}
    return lambda: subprocess.run(["bash", "bench/device/gpu_setup.sh", "install"], cwd=gpu, env=env,
                                  capture_output=True, text=True)


@needs_pip
def test_gpu_setup_install_puts_carried_peer_wheels_on_the_path_and_imports_the_peer(tmp_path):
    install = _gpu_install(tmp_path, "__version__ = '7.6.0-fake'\n")
    for expect in ("install: gptqmodel 7.6.0-fake imports", "wheels already in"):
        run = install()
        assert run.returncode == 0, run.stderr
        assert expect in run.stdout
    assert (tmp_path / "site/gptqmodel/__init__.py").is_file()


@needs_pip
def test_gpu_setup_install_goes_on_when_the_peer_does_not_import_yet(tmp_path):
    run = _gpu_install(tmp_path, "import datasets_missing\n")()
    assert run.returncode == 0, run.stderr
    assert "gptqmodel does not import yet" in run.stdout and "datasets_missing" in run.stdout
