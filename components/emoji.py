"""Convert an emoji-datasource npm package into a Hugging Face image folder.

The `emoji-datasource-<set>` packages (iamcal/emoji-data; sets apple, facebook, google,
twitter) hold `package/emoji.json`, one object per emoji, and each emoji's 64-pixel PNG at
`package/img/<set>/64/<image>`. Every emoji whose image the set has becomes one row, and
each of its skin-tone variations another, captioned with the emoji's Unicode name in
lower case: "grinning face", "waving hand, medium skin tone".

The output is what `parti data ingest` reads: `out/images/<image>` (the package's bytes,
unchanged, so the same package gives the same DVC digest) and `out/metadata.jsonl` with
`file_name`, `text` and the emoji's `unified`, `short_name`, `category`, `subcategory` and
`skin_tone`, which ingest keeps as the row's metadata. Rows carry no split: ingest splits
them by content hash.
"""

import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from parti_ops.components.ingest import IngestError
from parti_ops.components.shards import empty_own_folder

log = logging.getLogger(__name__)

# The Fitzpatrick modifiers' names in Unicode's emoji data (UTS #51, emoji-test.txt).
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
IMAGE_FOLDER = "64"  # pixels: the size every set of the package ships single images at
# emoji.json names images by their code points ("1f44b-1f3fd.png"); anything else could
# point outside the output folder and is refused.
IMAGE_NAME = re.compile(r"[0-9a-f]{2,6}(?:-[0-9a-f]{2,6})*\.png")
PACKAGE_NAME = re.compile(r"emoji-datasource-([a-z]+)")
MAX_JSON_BYTES = 64 << 20  # emoji.json is ~1.3 MB; a much larger member is not the package
MAX_IMAGE_BYTES = 4 << 20  # a 64x64 PNG is a few kB
# All the images read, together: one set's 64-pixel images are ~20 MB. Caps what a
# crafted archive of many large members could make the converter hold in memory.
MAX_TOTAL_BYTES = 1 << 30
METADATA = "metadata.jsonl"
IMAGES = "images"
HOW_TO_GET = "get one with `npm pack emoji-datasource-apple@16.0.0`"


@dataclass
class Package:
    """What the converter reads from a package, whichever form it came in."""

    path: Path
    manifest: dict[str, Any] | None = None  # package.json
    emoji: Any = None  # emoji.json, parsed
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)  # set → name → PNG

    read: int = 0  # bytes of images held so far

    def where(self, inner: str) -> str:
        return f"{self.path}: package/{inner}"

    def add_image(self, image_set: str, name: str, body: bytes) -> None:
        self.read += len(body)
        if self.read > MAX_TOTAL_BYTES:
            raise IngestError(
                f"{self.path}: over {MAX_TOTAL_BYTES} bytes of images; this is not an"
                f" emoji-datasource package; {HOW_TO_GET}"
            )
        self.images.setdefault(image_set, {})[name] = body


def from_emoji_datasource(package: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the image folder of an emoji-datasource package into `out_dir`.

    Args:
        package: the `.tgz` that `npm pack emoji-datasource-<set>@<version>` writes, or
            the folder it unpacks to (holding `package/` or `emoji.json` itself).
        out_dir: a missing or empty folder, or one an earlier conversion wrote (replaced).

    Returns:
        A summary: `rows` written, `emoji` and `skin_variations` among them, the image
        `set`, the package `version`, `not_in_set` (emoji and variations the set has no
        image for) and `skipped` (reason → count; each is also logged).

    Raises:
        IngestError: the package is missing, unsafe or not an emoji-datasource package, or
            `out_dir` holds other files; the message names the file and what to do.
    """
    package = Path(package)
    if not package.exists():
        raise IngestError(f"{package}: no such file or folder; {HOW_TO_GET}")
    pkg = _read_folder(package) if package.is_dir() else _read_tarball(package)
    image_set = _image_set(pkg)
    entries = _entries(pkg, image_set)
    images = pkg.images.get(image_set, {})
    if not images:
        raise IngestError(
            f"{pkg.where(f'img/{image_set}/{IMAGE_FOLDER}/')}: no PNG images; this package"
            " ships only sprite sheets or is damaged; re-download it"
        )
    rows, counts, skipped, missing = [], Counter(), Counter(), []
    for entry in entries:
        caption = _caption(entry)
        if caption is None:
            skipped["emoji without a name or short_name"] += 1
            continue
        variants = [(entry, None)]
        variations = entry.get("skin_variations") or {}
        if not isinstance(variations, dict) or not all(
            isinstance(v, dict) for v in variations.values()
        ):
            raise IngestError(
                f"{pkg.where('emoji.json')}: emoji {entry.get('unified')!r} has"
                f" skin_variations that are not objects; re-download the package ({HOW_TO_GET})"
            )
        for key, variant in variations.items():
            tones = _tones(key)
            if tones is None:
                skipped["skin variation of unknown code points"] += 1
                continue
            variants.append((variant, tones))
        for item, tones in variants:
            if not item.get(f"has_img_{image_set}"):
                counts["not_in_set"] += 1
                continue
            name = _image_name(pkg, entry, item)
            if name not in images:
                skipped["image listed in emoji.json but absent from the package"] += 1
                missing.append(name)
                continue
            rows.append(
                {
                    "file_name": f"{IMAGES}/{name}",
                    "text": caption if tones is None else f"{caption}, {tones}",
                    "unified": item.get("unified"),
                    "short_name": entry.get("short_name"),
                    "category": entry.get("category"),
                    "subcategory": entry.get("subcategory"),
                    "skin_tone": tones,
                }
            )
            counts["emoji" if tones is None else "skin_variations"] += 1
    if missing:
        log.warning("%s: %d images absent, e.g. %s", pkg.path, len(missing), missing[:5])
    for reason, n in skipped.items():
        log.warning("%s: skipped %d: %s", pkg.path, n, reason)
    _write(Path(out_dir), rows, images)
    summary = {
        "rows": len(rows),
        "emoji": counts["emoji"],
        "skin_variations": counts["skin_variations"],
        "not_in_set": counts["not_in_set"],
        "skipped": dict(skipped),
        "set": image_set,
        "version": (pkg.manifest or {}).get("version"),
        "out_dir": str(Path(out_dir).resolve()),
    }
    log.info("wrote %d %s emoji images to %s", len(rows), image_set, out_dir)
    return summary


# --- reading the package: a tarball or a folder, nothing outside it, no links ---


def _read_tarball(path: Path) -> Package:
    pkg = Package(path)
    try:
        # Streamed ("r|*"): one pass over the gzip, members read in archive order, and no
        # member is ever extracted to disk; only the few this needs are read at all.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                inner = _inner_path(path, member)
                if inner is None or not member.isfile():
                    continue
                if inner in ("emoji.json", "package.json"):
                    body = _member_bytes(tar, member, path, MAX_JSON_BYTES)
                    _take_json(pkg, inner, body)
                elif _is_single_image(inner):
                    _, image_set, _, name = inner.split("/")
                    pkg.add_image(
                        image_set, name, _member_bytes(tar, member, path, MAX_IMAGE_BYTES)
                    )
    except (tarfile.TarError, EOFError, OSError) as err:
        raise IngestError(
            f"{path}: not a readable .tgz package ({err}); {HOW_TO_GET}, or pass its folder"
        ) from err
    return pkg


def _inner_path(archive: Path, member: tarfile.TarInfo) -> str | None:
    """The member's path inside the package's top folder, or None for the folder itself.

    Raises:
        IngestError: for a link, a device or a path that leaves the archive.
    """
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise IngestError(
            f"{archive}: member {member.name!r} points outside the package; refusing it"
            f" (an npm package holds relative paths only); {HOW_TO_GET}"
        )
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "not a regular file"
        raise IngestError(
            f"{archive}: member {member.name!r} is {kind}; refusing the package (npm"
            f" packages hold regular files only); {HOW_TO_GET}"
        )
    # npm pack puts everything under one top folder, `package/`.
    return "/".join(name.parts[1:]) if len(name.parts) > 1 else None


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, limit: int) -> bytes:
    if member.size > limit:
        raise IngestError(
            f"{path}: member {member.name!r} is {member.size} bytes, over {limit}; this is"
            f" not an emoji-datasource package; {HOW_TO_GET}"
        )
    f = tar.extractfile(member)
    return f.read() if f else b""


def _read_folder(path: Path) -> Package:
    root = path / "package" if (path / "package" / "emoji.json").is_file() else path
    pkg = Package(path)
    for inner in ("emoji.json", "package.json"):
        file = root / inner
        if file.is_file():
            _take_json(pkg, inner, _file_bytes(file, root, MAX_JSON_BYTES))
    img = root / "img"
    if img.is_dir():
        for folder in sorted(img.glob(f"*/{IMAGE_FOLDER}")):
            if folder.is_dir() and not folder.is_symlink():
                for file in sorted(folder.iterdir()):
                    if IMAGE_NAME.fullmatch(file.name):
                        body = _file_bytes(file, root, MAX_IMAGE_BYTES)
                        pkg.add_image(folder.parent.name, file.name, body)
    return pkg


def _file_bytes(file: Path, root: Path, limit: int) -> bytes:
    if file.is_symlink() or not Path(os.path.realpath(file)).is_relative_to(root.resolve()):
        raise IngestError(
            f"{file}: a link, or a path outside {root}; refusing it (copy the package's own"
            " files in, or pass the .tgz)"
        )
    size = file.stat().st_size
    if size > limit:
        raise IngestError(f"{file}: {size} bytes, over {limit}; not an emoji-datasource file")
    return file.read_bytes()


def _is_single_image(inner: str) -> bool:
    parts = inner.split("/")
    return (
        len(parts) == 4
        and parts[0] == "img"
        and parts[2] == IMAGE_FOLDER
        and IMAGE_NAME.fullmatch(parts[3]) is not None
    )


def _take_json(pkg: Package, inner: str, body: bytes) -> None:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IngestError(
            f"{pkg.where(inner)} is not valid JSON ({err}); the package is damaged:"
            f" re-download it ({HOW_TO_GET})"
        ) from err
    if inner == "emoji.json":
        pkg.emoji = value
    else:
        pkg.manifest = value if isinstance(value, dict) else None


# --- interpreting it ---


def _image_set(pkg: Package) -> str:
    name = (pkg.manifest or {}).get("name")
    match = PACKAGE_NAME.fullmatch(name) if isinstance(name, str) else None
    if match:
        return match.group(1)
    if len(pkg.images) == 1:  # no package.json (a hand-made folder): the one image set
        return next(iter(pkg.images))
    raise IngestError(
        f"{pkg.where('package.json')}: names {name!r}, not emoji-datasource-<set>, and the"
        f" image sets found are {sorted(pkg.images) or 'none'}; pass one"
        f" emoji-datasource-<set> package ({HOW_TO_GET})"
    )


def _entries(pkg: Package, image_set: str) -> list[dict[str, Any]]:
    if pkg.emoji is None:
        raise IngestError(
            f"{pkg.where('emoji.json')}: not found; this is not an emoji-datasource"
            f" package ({HOW_TO_GET})"
        )
    if not isinstance(pkg.emoji, list) or not all(isinstance(e, dict) for e in pkg.emoji):
        raise IngestError(
            f"{pkg.where('emoji.json')}: not a list of emoji objects; re-download the"
            f" package ({HOW_TO_GET})"
        )
    flag = f"has_img_{image_set}"
    if pkg.emoji and not any(flag in e for e in pkg.emoji):
        raise IngestError(
            f"{pkg.where('emoji.json')}: no emoji has a {flag!r} field, so it cannot say"
            f" which images the {image_set} set has; use an emoji-datasource package of"
            " version 4 or later"
        )
    return pkg.emoji


def _image_name(pkg: Package, entry: dict[str, Any], item: dict[str, Any]) -> str:
    name = item.get("image")
    if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
        raise IngestError(
            f"{pkg.where('emoji.json')}: emoji {entry.get('unified')!r} names its image"
            f" {name!r}, not a file name of code points; the package is damaged or not"
            f" from emoji-datasource ({HOW_TO_GET})"
        )
    return name


def _caption(entry: dict[str, Any]) -> str | None:
    """The emoji's Unicode name in lower case; its short name where it has none."""
    for key in ("name", "short_name"):
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            text = value if key == "name" else re.sub(r"[_-]+", " ", value)
            return " ".join(text.lower().split())
    return None


def _tones(key: str) -> str | None:
    """'1F3FB-1F3FD' → 'light skin tone, medium skin tone'; None for other code points."""
    codes = key.upper().split("-")
    if not all(code in SKIN_TONES for code in codes):
        return None
    # Two people of one tone ("1F3FB-1F3FB") read as that tone once, as Unicode names them.
    return ", ".join(SKIN_TONES[code] for code in dict.fromkeys(codes))


# --- writing the image folder ---


def _write(out: Path, rows: list[dict[str, Any]], images: dict[str, bytes]) -> None:
    _clear(out)
    folder = out / IMAGES
    folder.mkdir(parents=True)
    for row in rows:
        target = out / row["file_name"]
        if not target.exists():
            target.write_bytes(images[target.name])
    # metadata.jsonl last, through a rename: a folder holding it is a finished conversion.
    partial = out / f".{METADATA}.partial"
    lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    partial.write_text(lines, encoding="utf-8", newline="\n")
    partial.replace(out / METADATA)


def _clear(out: Path) -> None:
    """Make `out` empty, deleting only what an earlier conversion wrote there."""
    empty_own_folder(out, _is_own, IngestError, "conversion")


def _is_own(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.name in (METADATA, f".{METADATA}.partial"):
        return entry.is_file()
    return (
        entry.name == IMAGES
        and entry.is_dir()
        and all(
            f.is_file() and not f.is_symlink() and IMAGE_NAME.fullmatch(f.name)
            for f in entry.iterdir()
        )
    )
