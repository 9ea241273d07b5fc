"""MkDocs hook: every recorded benchmark (bench/*.md, bench/studies/*.md, bench/device/README.md) becomes a
page of the guide under bench/, rendered from the file itself, so the results pages cannot drift from the
records. The records' own Markdown is used as it is; their only relative links are to their plots beside them
(bench/*.png), which are added too."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ("bench/*.md", "bench/studies/*.md", "bench/device/README.md", "bench/*.png", "bench/studies/*.png")


def records() -> list[Path]:
    """The benchmark records the guide renders and their plots, repository-relative."""
    return sorted({p.relative_to(ROOT) for pattern in RECORDS for p in ROOT.glob(pattern)})


def on_files(files, config):
    """Add each record that is not already a page of docs/ as a generated page."""
    for rel in records():
        if files.get_file_from_path(rel.as_posix()) is None:
            files.append(File.generated(config, rel.as_posix(), abs_src_path=str(ROOT / rel)))
    return files
