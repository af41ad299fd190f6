"""Readers that turn a raw defect dataset into a list of labelled image items.

Every reader returns a `Catalog`: the items it could read and the inputs it could not, each
with the file and the reason. Readers only look at annotations and file names; images are
decoded later, once, by `prepare`. Labels are image-level (multi-hot over class names); where
a format localises defects (VOC boxes, Severstal run-length masks) the regions are kept so that
tiling can give each tile its own labels.

One file for every format, on purpose: the readers share the Catalog, its one-item-per-file rule
and their messages, and each format is one section below (about 500 lines in all).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath

from defect_tune.data.files import walk_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class Region:
    """Where a defect of `label` lies in the source image.

    `box` is VOC's (xmin, ymin, xmax, ymax), 1-based and inclusive; `rle` is Severstal's
    run-length string (1-based starts, column-major over the full frame).
    """

    label: str
    box: tuple[int, int, int, int] | None = None
    rle: str | None = None


@dataclass(frozen=True)
class Item:
    id: str
    path: Path
    labels: tuple[str, ...]  # empty: defect-free
    regions: tuple[Region, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()  # extra string columns, e.g. the elpv cell type
    origin: str = ""  # the annotation this item's labels came from, for error messages


@dataclass(frozen=True)
class BadInput:
    file: str
    reason: str


@dataclass
class Catalog:
    items: list[Item] = field(default_factory=list)
    bad: list[BadInput] = field(default_factory=list)
    meta_columns: tuple[str, ...] = ()

    def skip(self, file: Path | str, reason: str) -> None:
        self.bad.append(BadInput(str(file), reason))


def _require(layout: str, *paths: Path, check=Path.exists) -> None:
    """Fail early, naming the first missing part of a dataset's layout."""
    for path in paths:
        if not check(path):
            raise FileNotFoundError(f"{path}: not found; {layout}")


def labelled_twice(path: Path, labels: list[tuple[str, ...]], where: str) -> str:
    """Why an image reached under two labels is refused, in every reader."""
    named = " vs ".join("+".join(label) or "defect-free" for label in labels)
    return f"{path} is one file labelled {named} by {where}; label it once (one class folder, one row)"


def read_once(path: Path, first: Path) -> str:
    """Why a second path to an image already read is left out, in every reader."""
    return f"{path} is the same file as {first} (through a link or another path to it): read once"


def one_item_per_file(catalog: Catalog) -> Catalog:
    """Every reader's last step: one item per image file, and one id per item.

    Two items that reach one file (two manifest rows through a link, an absolute and a relative
    path, two annotations of one image) keep the first where their labels agree; where they
    disagree the file has no one label, and every such item is refused and listed. Items whose
    ids collide (`a.png` and `a.jpg` in one folder) get their file suffix in the id, so splits,
    folds and counts never merge two images."""
    groups: dict[str, list[Item]] = {}
    for item in catalog.items:
        groups.setdefault(os.path.realpath(item.path), []).append(item)
    kept: list[Item] = []
    for items in groups.values():
        if len(items) == 1:
            kept.append(items[0])
            continue
        where = ", ".join(str(item.origin or item.path) for item in items)
        if len({item.labels for item in items}) > 1:
            for item in items:
                catalog.skip(item.origin or item.path, labelled_twice(item.path, [i.labels for i in items], where))
        else:
            kept.append(items[0])
            for item in items[1:]:
                catalog.skip(item.origin or item.path, read_once(item.path, items[0].path))
    order = {id(item): n for n, item in enumerate(catalog.items)}
    kept.sort(key=lambda item: order[id(item)])
    counts: dict[str, int] = {}
    for item in kept:
        counts[item.id] = counts.get(item.id, 0) + 1
    taken: set[str] = set()
    unique: list[Item] = []
    for item in kept:
        name = base = item.id if counts[item.id] == 1 else item.id + item.path.suffix
        n = 1
        while name in taken:  # the same name and suffix twice (files in different places): numbered
            n += 1
            name = f"{base}#{n}"
        taken.add(name)
        unique.append(item if name == item.id else replace(item, id=name))
    catalog.items = unique
    return catalog


def read_text(path: Path) -> io.StringIO:
    """A CSV's text for `csv`: UTF-8, with or without a byte-order mark (Excel writes one, which
    made the first column `\ufeffpath`); anything else is refused naming the file."""
    data = Path(path).read_bytes()
    try:
        return io.StringIO(data.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                         "save it as UTF-8") from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _inside(root: Path, relative: str) -> Path | None:
    """`root/relative` if it stays inside root lexically, else None.

    Lexical on purpose: datasets are often symlinked into place, and resolving links would
    flag those as outside.
    """
    if os.path.isabs(relative):
        return None
    joined = os.path.normpath(os.path.join(root, relative))
    if joined != str(root) and not joined.startswith(str(root) + os.sep):
        return None
    return Path(joined)


# ---------------------------------------------------------------- Pascal VOC (PVEL-AD, NEU-DET)


def _resolve_voc_image(images: Path, filename: str, xml_stem: str) -> Path | None:
    """Find the image an XML names; NEU-DET gives `<filename>` with and without extension."""
    direct = images / filename
    if direct.is_file():
        return direct
    stems = [filename] if Path(filename).suffix.lower() not in IMAGE_SUFFIXES else []
    stems += [str(Path(filename).with_suffix("")), xml_stem]
    for stem in stems:
        for suffix in IMAGE_SUFFIXES:
            for candidate in (images / (stem + suffix), images / (stem + suffix.upper())):
                if candidate.is_file():
                    return candidate
    return None


def _parse_box(obj: ET.Element) -> tuple[int, int, int, int] | None:
    box = obj.find("bndbox")
    if box is None:
        return None
    values = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = box.findtext(key)
        if text is None:
            raise ValueError(f"<bndbox> has no <{key}>")
        try:
            values.append(int(round(float(text))))
        except (ValueError, OverflowError):  # 'abc', 'nan', 'inf'
            raise ValueError(f"<bndbox> <{key}> {text.strip()!r} is not a finite number") from None
    xmin, ymin, xmax, ymax = values
    if xmax < xmin or ymax < ymin:
        raise ValueError(f"<bndbox> is inverted: {values}")
    return xmin, ymin, xmax, ymax


def read_voc(root: Path) -> Catalog:
    """Pascal VOC: `root/JPEGImages/*` and `root/Annotations/*.xml`, labels from `<object><name>`."""
    root = Path(root)
    images, annotations = root / "JPEGImages", root / "Annotations"
    _require("a VOC dataset needs JPEGImages/ and Annotations/", images, annotations, check=Path.is_dir)
    catalog = Catalog()
    claimed: dict[Path, Path] = {}
    for xml_path in sorted(annotations.glob("*.xml")):
        try:
            annotation = ET.parse(xml_path).getroot()
        except ET.ParseError as error:
            catalog.skip(xml_path, f"malformed XML: {error}")
            continue
        filename = (annotation.findtext("filename") or "").strip() or xml_path.stem
        if _inside(images, filename) is None:
            catalog.skip(xml_path, f"<filename> {filename!r} points outside {images}")
            continue
        image_path = _resolve_voc_image(images, filename, xml_path.stem)
        if image_path is None:
            catalog.skip(xml_path, f"image {filename!r} not found in {images} (tried common extensions)")
            continue
        if image_path in claimed:
            catalog.skip(xml_path, f"image {image_path.name} is already annotated by {claimed[image_path]}")
            continue
        # Claimed before its objects are read: an image whose XML is rejected is listed once, under
        # the XML with the reason, not a second time as an image without annotation.
        claimed[image_path] = xml_path
        labels: list[str] = []
        regions: list[Region] = []
        try:
            for obj in annotation.findall("object"):
                name = (obj.findtext("name") or "").strip()
                if not name:
                    raise ValueError("<object> without a <name>")
                if name not in labels:
                    labels.append(name)
                regions.append(Region(name, box=_parse_box(obj)))
        except ValueError as error:
            catalog.skip(xml_path, f"bad <object>: {error}")
            continue
        relative = image_path.relative_to(images)
        catalog.items.append(
            Item(
                id=str(relative.with_suffix("")),
                path=image_path,
                labels=tuple(sorted(labels)),
                regions=tuple(r for r in regions if r.box is not None),
                origin=str(xml_path),
            )
        )
    for image_path in sorted(p for p in images.rglob("*") if p.is_file() and _is_image(p)):
        if image_path not in claimed:
            catalog.skip(image_path, "image has no annotation XML in Annotations/")
    return catalog


# ---------------------------------------------------------------- Severstal steel (train.csv + RLE)

_RLE = re.compile(r"^\s*\d+(\s+\d+)*\s*$")
# Above any frame decode accepts (PIL refuses images of more than twice its 89-megapixel limit),
# and far below int64, which a mask's start + length must fit in.
MAX_RLE_VALUE = 2**31 - 1


def check_rle(rle: str) -> None:
    """Raise ValueError unless `rle` is pairs of positive integers (start, length)."""
    if not _RLE.match(rle):
        raise ValueError("EncodedPixels is not a list of integers")
    values = rle.split()
    if len(values) % 2:
        raise ValueError("EncodedPixels has an odd number of values (needs start/length pairs)")
    # Compared as text first: Python refuses to read an integer of over 4300 digits.
    huge = next((v for v in values if len(v.lstrip("0")) > len(str(MAX_RLE_VALUE)) or int(v) > MAX_RLE_VALUE), None)
    if huge is not None:
        shown = huge if len(huge) <= 24 else f"{huge[:12]}...({len(huge)} digits)"
        raise ValueError(f"EncodedPixels value {shown} is larger than any image's pixel count (at most "
                         f"{MAX_RLE_VALUE})")
    if any(int(n) < 1 for n in values):
        raise ValueError("EncodedPixels has a start or length below 1")


def read_severstal(root: Path) -> Catalog:
    """Severstal: `root/train.csv` (ImageId,ClassId,EncodedPixels; one row per defect) and
    `root/train_images/`. Images with no row are defect-free. The older
    `ImageId_ClassId,EncodedPixels` layout (empty pixels = no defect) is read too."""
    root = Path(root)
    table, images = root / "train.csv", root / "train_images"
    _require("a Severstal dataset needs train.csv and train_images/", table, images)
    catalog = Catalog()
    regions: dict[str, list[Region]] = {}
    broken: dict[str, str] = {}
    with read_text(table) as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        old_layout = "ImageId_ClassId" in columns
        needed = {"ImageId_ClassId", "EncodedPixels"} if old_layout else {"ImageId", "ClassId", "EncodedPixels"}
        if not needed <= columns:
            raise ValueError(f"{table}: header must have {sorted(needed)}, found {sorted(columns)}")
        for line, row in enumerate(reader, start=2):
            where = f"{table}:{line}"
            if old_layout:
                image_id, _, class_id = (row["ImageId_ClassId"] or "").rpartition("_")
            else:
                image_id, class_id = row["ImageId"] or "", row["ClassId"] or ""
            image_id, class_id, rle = image_id.strip(), class_id.strip(), (row["EncodedPixels"] or "").strip()
            if not image_id:
                catalog.skip(where, "row has no ImageId")
                continue
            if old_layout and not rle:
                regions.setdefault(image_id, [])  # the old layout lists defect-free classes too
                continue
            try:
                if not class_id.isdigit() or int(class_id) < 1:
                    raise ValueError(f"ClassId {class_id!r} is not a positive integer")
                check_rle(rle)
            except ValueError as error:
                # The image's labels are incomplete without this row: skip the image, not just the row.
                broken.setdefault(image_id, f"{where}: {error}")
                continue
            regions.setdefault(image_id, []).append(Region(f"class_{int(class_id)}", rle=rle))
    on_disk = {p.name: p for p in images.iterdir() if p.is_file() and _is_image(p)}
    for image_id, reason in sorted(broken.items()):
        catalog.skip(images / image_id, f"bad annotation row ({reason})")
    for image_id in sorted(set(regions) - set(on_disk) - set(broken)):
        catalog.skip(images / image_id, f"listed in {table} but not found in {images}")
    for name, path in sorted(on_disk.items()):
        if name in broken:
            continue
        found = regions.get(name, [])
        catalog.items.append(
            Item(
                id=Path(name).stem,
                path=path,
                labels=tuple(sorted({r.label for r in found})),
                regions=tuple(found),
                origin=str(table),
            )
        )
    return catalog


# ---------------------------------------------------------------- one folder per class


def read_folders(root: Path, defect_free: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Catalog:
    """One top-level folder per class, images anywhere below it (casting `def_front`,
    magnetic-tile `MT_Blowhole/Imgs`). Folders named in `defect_free` hold defect-free images.
    `exclude` globs (matched against paths relative to root) leave files out on purpose, e.g.
    the magnetic-tile masks `*.png`. Hidden files (".DS_Store") are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    missing = [name for name in defect_free if name not in folders]
    if missing:
        raise ValueError(f"{root}: defect-free folder(s) {missing} not found; folders are {sorted(folders)}")
    catalog = Catalog()
    walk = walk_files(root)

    def left_out(path: Path) -> bool:  # hidden, or excluded on purpose
        relative = path.relative_to(root)
        return any(part.startswith(".") for part in relative.parts) or any(relative.match(p) for p in exclude)

    def label_of(path: Path) -> str:
        folder = path.relative_to(root).parts[0]
        return "defect-free" if folder in defect_free else folder

    # A file reached through two class folders (a folder or file linked into another class) has
    # no one label: it is refused, and listed with every path that reaches it.
    paths_of: dict[Path, list[Path]] = {}
    for later, first in walk.again.items():
        if not left_out(later) and not left_out(first):
            paths_of.setdefault(first, [first]).append(later)
    refused: set[Path] = set()
    for first, paths in paths_of.items():
        labels = sorted({label_of(p) for p in paths if len(p.relative_to(root).parts) > 1})
        if len(labels) > 1:
            refused.add(first)
            for path in paths:
                catalog.skip(path, labelled_twice(path, [(label,) for label in labels], ", ".join(map(str, paths))))
        else:
            for path in paths[1:]:
                catalog.skip(path, read_once(path, first))
    for path, problem in walk.problems:
        if not left_out(path):
            catalog.skip(path, problem)
    for path in walk.files:
        relative = path.relative_to(root)
        if left_out(path) or path in refused:
            continue
        if len(relative.parts) < 2:
            catalog.skip(path, "file is not inside a class folder")
            continue
        if not _is_image(path):
            catalog.skip(path, f"not an image file (suffix {path.suffix or 'none'})")
            continue
        folder = relative.parts[0]
        labels = () if folder in defect_free else (folder,)
        catalog.items.append(Item(id=str(relative.with_suffix("")), path=path, labels=labels, origin=str(path.parent)))
    used = {Path(item.id).parts[0] for item in catalog.items}
    for folder in sorted(name for name in folders if not name.startswith(".") and name not in used):
        if not any(PurePath(folder, "x").match(pattern) or PurePath(folder).match(pattern) for pattern in exclude):
            catalog.skip(root / folder, "class folder holds no images: the class would have no examples")
    return catalog


# ---------------------------------------------------------------- CSV manifest


def read_manifest(manifest: Path) -> Catalog:
    """A CSV with `path,labels` (labels separated by ';', empty = defect-free). Paths are
    relative to the CSV's folder or absolute. Other columns are kept as string metadata."""
    manifest = Path(manifest)
    if manifest.is_dir():
        raise ValueError(f"{manifest}: give the manifest CSV file itself, not a folder")
    base = manifest.parent
    catalog = Catalog()
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}  # path -> its first line and labels
    conflicted: dict[str, int] = {}  # path -> the first later line that labels it differently
    keys: list[str] = []  # each item's path key
    with read_text(manifest) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if "path" not in header or "labels" not in header:
            raise ValueError(f"{manifest}: header must have 'path' and 'labels' columns, found {header}")
        extra = tuple(h for h in header if h not in ("path", "labels"))
        catalog.meta_columns = extra
        for line, row in enumerate(reader, start=2):
            where = f"{manifest}:{line}"
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) != len(header):
                catalog.skip(where, f"row has {len(row)} fields, header has {len(header)}")
                continue
            record = dict(zip(header, (cell.strip() for cell in row)))
            if not record["path"]:
                catalog.skip(where, "empty path")
                continue
            key = os.path.normpath(record["path"])  # ./img/a.jpg and img/a.jpg are one file
            labels = tuple(sorted({name.strip() for name in record["labels"].split(";") if name.strip()}))
            if key in seen:
                first, first_labels = seen[key]
                if labels == first_labels:
                    catalog.skip(where, f"duplicate row for {record['path']!r} (first at line {first})")
                else:  # which row is right cannot be known here: neither is kept
                    catalog.skip(where, f"{record['path']!r} is labelled {list(labels)} here but {list(first_labels)} "
                                        f"at line {first}; label the image once")
                    conflicted.setdefault(key, line)
                continue
            seen[key] = (line, labels)
            if os.path.isabs(record["path"]):
                path = Path(record["path"])  # a file elsewhere, named in full: the user's choice
            else:
                path = base / record["path"]
                if _inside(base.absolute(), record["path"]) is None:
                    catalog.skip(where, f"{record['path']!r} leaves the manifest's folder {base}; "
                                        "give an absolute path to use a file elsewhere")
                    continue
            catalog.items.append(
                Item(
                    id=str(Path(record["path"]).with_suffix("")),
                    path=path,
                    labels=labels,
                    meta=tuple((column, record[column]) for column in extra),
                    origin=where,
                )
            )
            keys.append(key)
    kept = []
    for item, key in zip(catalog.items, keys):
        if key in conflicted:
            catalog.skip(item.origin, f"{item.path.name}: labelled differently at line {conflicted[key]}; label the "
                                      "image once")
        else:
            kept.append(item)
    catalog.items = kept
    return catalog


# ---------------------------------------------------------------- elpv (real EL solar cells)


def elpv_root() -> Path:
    """The data folder of the optional `elpv-dataset` package."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the elpv images come from the optional elpv-dataset package (CC BY-NC-SA 4.0, "
            "non-commercial): pip install 'defect-tune[elpv]', or give the folder holding labels.csv"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_elpv(root: Path | None, threshold: float = 0.5) -> Catalog:
    """elpv: `labels.csv` lines `images/cellNNNN.png probability type`. A cell is `defective`
    when its defect probability (0, 1/3, 2/3, 1) is at least `threshold`; the cell type
    (mono/poly) and the probability are kept as metadata."""
    root = elpv_root() if root is None else Path(root)
    table = root / "labels.csv"
    _require("an elpv dataset needs labels.csv and images/", table, check=Path.is_file)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"elpv threshold must be in (0, 1], got {threshold}")
    catalog = Catalog(meta_columns=("cell_type", "defect_probability"))
    for line, text in enumerate(table.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        fields = text.split()
        where = f"{table}:{line}"
        if len(fields) != 3:
            catalog.skip(where, f"expected 'path probability type', got {len(fields)} fields")
            continue
        relative, probability_text, cell_type = fields
        try:
            probability = float(probability_text)
        except ValueError:
            catalog.skip(where, f"probability {probability_text!r} is not a number")
            continue
        if not 0.0 <= probability <= 1.0:
            catalog.skip(where, f"probability {probability} is outside [0, 1]")
            continue
        path = _inside(root, relative)
        if path is None:
            catalog.skip(where, f"path {relative!r} points outside {root}")
            continue
        catalog.items.append(
            Item(
                id=str(Path(relative).with_suffix("")),
                path=path,
                labels=("defective",) if probability >= threshold - 1e-9 else (),
                meta=(("cell_type", cell_type), ("defect_probability", f"{probability:.4f}")),
                origin=where,
            )
        )
    return catalog
