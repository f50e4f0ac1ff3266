"""Dataset manifests: one TOML file per known dataset in ``data_manifests/``, scanned into a dict.

A manifest gives class names, prompt names and templates, the source, licence and normalisation.
Users add their own with :func:`add_manifest`.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dds.errors import DdsError

DEFAULT_TEMPLATES = ["a photo of a {}."]


@dataclass(frozen=True)
class Manifest:
    """What dds knows about one dataset."""

    name: str  # the manifest name, used as SOURCE in `dds shard`
    classes: list[str]  # class names in label order
    prompt_names: list[str]  # names cleaned for prompts, same order as classes
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # "{}" = class name
    source: str = ""  # where the data comes from
    licence: str = ""
    format: str = ""  # reader to use: "idx-gz" (gzip IDX files) or "" (no built-in reader)
    root: str = ""  # folder holding the files of `splits`
    install_hint: str = ""  # command that installs the files when they are missing
    splits: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> {images, labels} file names
    image_size: int = 0
    channels: int = 3
    mean: list[float] | None = None  # per-channel normalisation; None: dds shard computes it from the images
    std: list[float] | None = None
    homepage: str = ""
    noise_map: dict[str, str] = field(default_factory=dict)  # class -> confusable class, for asymmetric label noise

    @property
    def states_normalisation(self) -> bool:
        """Whether the manifest gives mean and std (else ``dds shard`` computes them from the images)."""
        return bool(self.mean and self.std)

    def prompts(self) -> list[list[str]]:
        """For each class, its prompts (one per template)."""
        return [[t.format(n) for t in self.templates] for n in self.prompt_names]


def manifest_from_dict(d: dict[str, Any]) -> Manifest:
    """Build a :class:`Manifest` from parsed TOML, checking the fields that must agree."""
    known = set(Manifest.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise DdsError(f"manifest '{d.get('name', '?')}' has unknown fields {sorted(unknown)}; known: {sorted(known)}")
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise DdsError("manifest has no name; add a line name = \"my-dataset\"")
    classes = d.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise DdsError(f"manifest '{d['name']}': classes must be a list of class names, e.g. classes = [\"cat\", \"dog\"]")
    d = dict(d)
    d.setdefault("prompt_names", [c.lower() for c in classes])
    m = Manifest(**d)
    if not m.classes:
        raise DdsError(f"manifest '{m.name}' lists no classes")
    if len(m.prompt_names) != len(m.classes):
        raise DdsError(f"manifest '{m.name}': {len(m.classes)} classes but {len(m.prompt_names)} prompt_names")
    return m


def _scan() -> dict[str, Manifest]:
    out = {}
    for entry in resources.files("dds.data_manifests").iterdir():
        if entry.name.endswith(".toml"):
            m = manifest_from_dict(tomllib.loads(entry.read_text()))
            out[m.name] = m
    return out


_MANIFESTS: dict[str, Manifest] = {}


def list_manifests() -> list[str]:
    """Names of the known manifests."""
    if not _MANIFESTS:
        _MANIFESTS.update(_scan())
    return sorted(_MANIFESTS)


def get_manifest(name: str) -> Manifest:
    """The manifest called ``name``; a clear error listing the known ones otherwise."""
    if name not in list_manifests():
        raise DdsError(f"unknown dataset manifest '{name}'; known: {', '.join(list_manifests())} "
                       "(or use imagefolder:PATH / tar:GLOB)")
    return _MANIFESTS[name]


def add_manifest(path: str | Path) -> Manifest:
    """Register the manifest in TOML file ``path`` (replacing one of the same name).

    A relative ``root`` is taken from the file's folder, so a manifest can sit next to its data.

    Raises:
        DdsError: the file is missing or not valid TOML, or its fields do not agree.
    """
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text())
    except OSError as e:
        raise DdsError(f"cannot read manifest file {path} ({e.strerror}); give the path of a .toml manifest") from None
    except tomllib.TOMLDecodeError as e:
        raise DdsError(f"manifest file {path} is not valid TOML ({e}); see data_manifests/fashion-mnist.toml") from None
    if d.get("root") and not Path(d["root"]).is_absolute():
        d["root"] = str(path.parent / d["root"])
    m = manifest_from_dict(d)
    list_manifests()
    _MANIFESTS[m.name] = m
    return m
