"""(GPU machine) Is every requirement of the installed vLLM — and of each carried package — met by what
is importable now (the image plus /tmp/vsite)? Prints the unmet ones and exits 1 if any; then imports
vllm and prints its version. Uses only the standard library and `packaging` (in the GPU image).

    PYTHONPATH=/tmp/vsite:$PYTHONPATH python3 bench/device/vllm_check.py [--site /tmp/vsite]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENV = {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "platform_machine": "x86_64",
       "sys_platform": "linux", "platform_system": "Linux", "implementation_name": "cpython"}


def installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in md.distributions():  # sys.path order: /tmp/vsite (first on PYTHONPATH) wins
        out.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return out


def unmet(root: str, have: dict[str, str], carried: set[str]) -> list[str]:
    problems, seen, queue = [], set(), [(root, set())]
    while queue:
        name, extras = queue.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({**ENV, "extra": e}) for e in (extras or {""})):
                continue
            dep = canonicalize_name(req.name)
            if dep not in have:
                problems.append(f"{name} needs {req}: not installed")
            elif not req.specifier.contains(have[dep], prereleases=True):
                problems.append(f"{name} needs {req}: {dep} {have[dep]} is installed")
            elif dep in carried:
                queue.append((req.name, set(req.extras)))
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--site", default="/tmp/vsite")
    args = ap.parse_args()
    have = installed()
    carried = {canonicalize_name(p.name.split("-")[0]) for p in Path(args.site).glob("*.dist-info")}
    if "vllm" not in have:
        print("vllm is not installed (run bench/device/vllm_setup.sh install)")
        return 1
    problems = unmet("vllm", have, carried)
    for p in problems:
        print("unmet:", p)
    print(f"{len(problems)} unmet requirements ({len(carried)} carried packages)")
    import vllm  # noqa: F401  (the import itself is the check that matters most)

    print("vllm", vllm.__version__, "imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
