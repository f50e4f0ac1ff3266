"""Class names and prompt templates given to ``dds shard`` (``--class-names FILE``, ``--templates FILE``).

Text prompts are built from a class's *prompt name*; a folder called ``n01440764`` makes the prompt
"a photo of a n01440764.", which means nothing to a text encoder. These parsers read the user's
mapping (folder id -> readable name) and prompt ensemble; :func:`looks_like_ids` spots the classes
that need one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from dds.errors import DdsError

#: a class name that is an identifier, not a word: a WordNet synset (n01440764) or a number
_ID_RE = re.compile(r"n\d{8}|\d+")
#: one line of a class-names file: ``id name`` or ``id,name`` (the name may hold spaces and commas)
_LINE_RE = re.compile(r"\s*([^\s,]+)\s*[,\s]\s*(.*?)\s*")


def parse_class_names(text: str, where: str) -> dict[str, str]:
    """Class id -> readable name, from a JSON object or from ``id name`` / ``id,name`` lines.

    Blank lines, ``#`` comments and a CSV header line ``id,name`` are skipped; a name in double
    quotes loses them. ImageNet's ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``) reads as is.

    Args:
        text: the file's content.
        where: the file, for messages.

    Raises:
        DdsError: a line with no name, an id given twice, or JSON that is not an object of strings.
    """
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise DdsError(f"class-names file {where} is not valid JSON ({e}); give an object {{\"id\": \"name\"}}") from None
        if not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise DdsError(f"class-names file {where}: every value must be a non-empty name")
        return {str(k): v.strip() for k, v in mapping.items()}
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE_RE.fullmatch(line)
        name = m.group(2).strip('"').strip() if m else ""
        if not name:
            raise DdsError(f"class-names file {where}, line {n}: expected 'id name' or 'id,name', got {line.strip()!r}")
        if not out and (m.group(1).lower(), name.lower()) == ("id", "name"):
            continue  # a CSV header
        if m.group(1) in out:
            raise DdsError(f"class-names file {where}, line {n}: class id {m.group(1)!r} is named twice")
        out[m.group(1)] = name
    return out


def parse_templates(text: str, where: str) -> list[str]:
    """Prompt templates, one per line, each with one ``{}`` where the class name goes.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
        DdsError: no template, or a template without exactly one ``{}`` (or with other braces).
    """
    templates = [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]
    if not templates:
        raise DdsError(f"templates file {where} holds no template; write one per line, e.g. 'a photo of a {{}}.'")
    for t in templates:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise DdsError(f"template {t!r} in {where} must hold exactly one '{{}}' (where the class name goes) "
                           "and no other braces")
    return templates


def names_for(classes: list[str], mapping: dict[str, str], where: str) -> list[str]:
    """The readable name of every class (label order); ids of the file that are not classes are ignored.

    Raises:
        DdsError: classes the mapping does not name (the first few are listed).
    """
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise DdsError(f"class-names file {where} names no class {', '.join(missing[:5])}"
                       f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}; add a line 'id name' for each")
    return [mapping[c] for c in classes]


def looks_like_ids(names: list[str]) -> bool:
    """True when most names (over half) are synset ids or numbers, so prompts built from them say nothing."""
    return bool(names) and sum(bool(_ID_RE.fullmatch(n.strip())) for n in names) * 2 > len(names)


def read_text_file(path: str | Path, what: str) -> str:
    """The content of the ``what`` file ``path`` (UTF-8).

    Raises:
        DdsError: the file cannot be read.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DdsError(f"cannot read the {what} file {path} ({e}); give a UTF-8 text file") from None
