"""Presets: a targets directory whose manifest carries a ``name`` and a short
``description`` (``targets build --name ... --description ...``). ``targets list``
shows them; ``targets blend`` takes a name wherever it takes a directory."""
from __future__ import annotations

import json
from pathlib import Path

from ..targets.store import MANIFEST, atomic_write, read_manifest
from .inputs import UsageError


def set_preset(targets_dir, name: str | None, description: str | None) -> None:
    """Record ``name`` / ``description`` in the manifest of ``targets_dir`` (atomic rewrite;
    a None leaves the field as it is)."""
    if name is None and description is None:
        return
    man = read_manifest(targets_dir)
    if name is not None:
        man["name"] = name
    if description is not None:
        man["description"] = description
    atomic_write(Path(targets_dir) / MANIFEST, (json.dumps(man, indent=1, sort_keys=True) + "\n").encode())


def check_preset_name(name: str | None) -> str | None:
    """UsageError unless ``name`` is a non-empty word of letters, digits, '-', '_' or '.'."""
    if name is not None and (not name or not all(c.isalnum() or c in "-_." for c in name)):
        raise UsageError(f"--name {name!r} must be one word of letters, digits, '-', '_' or '.'")
    return name


def find_target_dirs(roots) -> list[Path]:
    """Each root that is a targets directory, else the targets directories anywhere below
    it (subfolders of subfolders too; a targets directory's own subfolders are not searched),
    in sorted path order."""
    import os
    found = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UsageError(f"{root} is not a directory: give directories that hold targets")
        if (root / MANIFEST).is_file():
            found.append(root)
            continue
        below = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if MANIFEST in filenames and dirpath != str(root):
                below.append(Path(dirpath))
                dirnames[:] = []                 # a targets directory holds shards, not more targets
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(sorted(below))
    return found


def list_presets(roots) -> list[dict]:
    """One row per targets directory under ``roots``: name, description, path, kind,
    k, vocab_size, n_sequences, teacher, complete (unreadable manifests are skipped).

    Args:
        roots: directories, each a targets directory or a folder of them.
    Returns:
        A list of dicts, in the order found.
    """
    rows = []
    for d in find_target_dirs(roots):
        try:
            man = read_manifest(d)
        except ValueError:
            continue
        rows.append({"name": man.get("name"), "description": man.get("description"), "path": str(d),
                     "kind": man.get("kind", "topk"), "k": man.get("k"), "vocab_size": man.get("vocab_size"),
                     "n_sequences": man.get("n_sequences"), "teacher": man.get("teacher"),
                     "complete": bool(man.get("complete"))})
    return rows


#: columns of ``targets list``: (header, row key, right-aligned); the free-text description comes last
LIST_COLUMNS = (("name", "name", False), ("kind", "kind", False), ("k", "k", True), ("vocab", "vocab_size", True),
                ("seqs", "n_sequences", True), ("path", "path", False), ("description", "description", False))


def format_table(rows: list[dict]) -> str:
    """The rows of ``targets list`` as a table: every column as wide as its widest cell,
    two spaces between columns, the description last (it may be long)."""
    def cell(r, key):
        v = r.get(key)
        text = "-" if v is None or v == "" else str(v)
        return text + ("  (INCOMPLETE)" if key == "description" and not r.get("complete") else "")
    cells = [[h for h, _, _ in LIST_COLUMNS]] + [[cell(r, key) for _, key, _ in LIST_COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(LIST_COLUMNS))]
    lines = []
    for c in cells:
        parts = [c[i].rjust(widths[i]) if right else c[i].ljust(widths[i])
                 for i, (_, _, right) in enumerate(LIST_COLUMNS[:-1])]
        lines.append("  ".join(parts + [c[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def resolve_target_dir(name_or_path: str, search: list[str]) -> Path:
    """A directory path as given, else the preset of that name among ``search``'s directories.

    Raises:
        UsageError: neither a targets directory nor a known preset name (lists the names known).
    """
    p = Path(name_or_path)
    if (p / MANIFEST).is_file():
        return p
    rows = list_presets([s for s in search if Path(s).is_dir()])
    hits = [r for r in rows if r["name"] == name_or_path]
    if len(hits) > 1:
        raise UsageError(f"preset name {name_or_path!r} is used by {', '.join(r['path'] for r in hits)}: "
                         "pass a path instead")
    if hits:
        return Path(hits[0]["path"])
    known = sorted({r["name"] for r in rows if r["name"]})
    raise UsageError(f"{name_or_path!r} is neither a targets directory nor a preset name in --presets "
                     f"{' '.join(search)} (known: {', '.join(known) or 'none'}); build it with targets build --name")


#: the metadata file of a style head directory (dft_kernels.hf.style_head_io.META)
STYLE_HEAD_META = "style_head.json"


def resolve_style_head(name_or_path: str, search: list[str]) -> Path:
    """A style head directory as given, else the style head whose ``name`` (``train --style-head
    ... --style-name``, or the targets preset it was trained on) is ``name_or_path`` among the
    style head directories below ``search``'s folders.

    Raises:
        UsageError: neither a style head directory nor a known name (lists the names known).
    """
    import os
    p = Path(name_or_path)
    if (p / STYLE_HEAD_META).is_file():
        return p
    found = {}
    for root in (Path(s) for s in search if Path(s).is_dir()):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.startswith("checkpoint-")]
            if STYLE_HEAD_META in filenames:
                try:
                    name = json.loads((Path(dirpath) / STYLE_HEAD_META).read_text()).get("name")
                except (OSError, ValueError, AttributeError):
                    continue
                if name:
                    found.setdefault(name, []).append(dirpath)
    hits = found.get(name_or_path, [])
    if len(hits) > 1:
        raise UsageError(f"style head name {name_or_path!r} is used by {', '.join(hits)}: pass a path instead")
    if hits:
        return Path(hits[0])
    raise UsageError(f"--style-head {name_or_path!r} is neither a style head directory ({STYLE_HEAD_META}) nor a "
                     f"style head name in --presets {' '.join(search)} (known: {', '.join(sorted(found)) or 'none'}); "
                     "train one with dft-kernels train --style-head RANK")
