"""`prepare`: a raw defect dataset in, preprocessed Parquet shards plus `meta.json` out.

Images are decoded and resized here, once, in parallel; training only ever reads the shards.

Output layout (the contract every later stage reads):

    DIR/meta.json              classes, counts per split, image shape, fingerprints, the command
    DIR/bad_inputs.csv         every input that was skipped, with the reason (header only if none)
    DIR/{train,val,test}/part-NNNNN.parquet
        id        string   unique per stored image ("#tK" marks the K-th tile of a source image)
        source    string   the image file it came from
        split     string
        group     string   sha256 of the source file: duplicates and tiles share it, and a group
                           never straddles splits
        pixels    binary   height*width uint8 grayscale, row-major
        height    int32
        width     int32
        labels    fixed_size_list<uint8>[C], multi-hot in meta.json's class order
        meta_*    string   per-image metadata columns (e.g. meta_cell_type for elpv)

Rows are shuffled within each split (seeded), so every shard is a fair sample of its split.

One file, on purpose (about 580 lines): the steps of `_prepare` (read, decode in parallel, check,
split, write, summarise) are functions in the order they run, read top to bottom.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from defect_tune import __version__
from defect_tune.core.errors import environment_error
from defect_tune.data.choices import FITS, FORMATS
from defect_tune.data.images import BIT_DEPTHS, MAX_IMAGE_SIZE, decode_or_reason
from defect_tune.data.prepare_out import (
    PrepareError,
    check_out_dir,
    clear_dead_staging,
    lock_out,
    swap_in,
    terminate_as_exit,
)
from defect_tune.data.readers import (
    BadInput,
    Catalog,
    Item,
    one_item_per_file,
    read_elpv,
    read_folders,
    read_manifest,
    read_severstal,
    read_voc,
)
from defect_tune.data.splits import SPLITS, long_tail_subsample, stratified_split
from defect_tune.data.synthetic import SyntheticSpec, generate_voc

META_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrepareOptions:
    source: Path | None
    format: str
    out: Path
    image_size: int = 224
    bit_depth: int | None = None  # a deeper sensor's bit depth; None: each image's smallest that holds it
    fit: str | None = None  # None: "keep" for Severstal frames, "pad" otherwise
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    classes: tuple[str, ...] | None = None
    long_tail: float | None = None
    strict: bool = False
    overwrite: bool = False
    workers: int | None = None  # None: all cores
    shard_rows: int = 512
    defect_free_folders: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    elpv_threshold: float = 0.5
    stratify_by: tuple[str, ...] | None = None  # None: the cell type for elpv, nothing otherwise
    synthetic_images: int = SyntheticSpec.num_images
    synthetic_imbalance: float = SyntheticSpec.imbalance
    command: str = ""

    @property
    def resolved_fit(self) -> str:
        return self.fit or ("keep" if self.format == "severstal" else "pad")

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise PrepareError(f"unknown --format {self.format!r}; choose one of {FORMATS}")
        if self.resolved_fit not in FITS:
            raise PrepareError(f"unknown --fit {self.fit!r}; choose one of {FITS}")
        if self.bit_depth is not None and self.bit_depth not in BIT_DEPTHS:
            raise PrepareError(f"--bit-depth must be between {BIT_DEPTHS[0]} and {BIT_DEPTHS[-1]} (8-bit images need "
                               f"none), got {self.bit_depth}")
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise PrepareError(f"--image-size must be between 8 and {MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        fractions = self.split
        if (len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions)
                or abs(sum(fractions) - 1) > 1e-6):
            raise PrepareError("--split needs three finite fractions >= 0 that sum to 1, got "
                               f"{'/'.join(map(str, fractions))}")
        if fractions[0] <= 0 or fractions[1] <= 0:
            # Training without a validation split has nothing to pick its epoch, thresholds or trial by.
            raise PrepareError("--split needs train and validation fractions above 0, got "
                               f"{'/'.join(map(str, fractions))}")
        if self.long_tail is not None and not (math.isfinite(self.long_tail) and self.long_tail >= 1):
            raise PrepareError("--long-tail is the ratio of the most to the least frequent class, at least 1; got "
                               f"{self.long_tail}")
        if not 0 <= self.seed < 2**32:
            raise PrepareError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise PrepareError("--workers must be at least 1 decode process (leave it out for one per core), got "
                               f"{self.workers}")
        if self.shard_rows < 1:
            raise PrepareError(f"--shard-rows must be at least 1, got {self.shard_rows}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise PrepareError(f"--classes lists a class twice: {list(self.classes)}")
        if self.source is None and self.format != "elpv":
            raise PrepareError(f"--format {self.format} needs a SOURCE path")


def read_catalog(options: PrepareOptions) -> Catalog:
    return one_item_per_file(_read(options))


def _read(options: PrepareOptions) -> Catalog:
    source = options.source
    try:
        if options.format == "synthetic":
            spec = SyntheticSpec(
                num_images=options.synthetic_images,
                image_size=options.image_size,
                imbalance=options.synthetic_imbalance,
                seed=options.seed,
            )
            generate_voc(source, spec)
            return read_voc(source)
        if options.format == "voc":
            return read_voc(source)
        if options.format == "severstal":
            return read_severstal(source)
        if options.format == "folders":
            return read_folders(source, options.defect_free_folders, options.exclude)
        if options.format == "csv":
            return read_manifest(source)
        return read_elpv(source, options.elpv_threshold)
    except (OSError, ValueError, ModuleNotFoundError) as error:
        raise PrepareError(str(error)) from error


def _apply_classes(catalog: Catalog, classes: tuple[str, ...] | None) -> list[str]:
    """Fix the class order: as given, else discovered and sorted. Items with a class outside a
    given list are skipped (dropping just the label would turn a defect into a false negative)."""
    if classes is None:
        return sorted({label for item in catalog.items for label in item.labels})
    known = set(classes)
    carried = {label for item in catalog.items for label in item.labels}
    absent = [name for name in classes if name not in carried]
    if absent:
        raise PrepareError(f"--classes names {absent}, which no image carries; the classes found are {sorted(carried)}")
    kept = []
    for item in catalog.items:
        unknown = sorted(set(item.labels) - known)
        if unknown:
            catalog.skip(item.origin or item.path, f"unknown class {unknown[0]!r} for {item.path.name}; --classes "
                                                   f"allows {list(classes)}")
        else:
            kept.append(item)
    catalog.items = kept
    return list(classes)


def _fail_if_strict(options: PrepareOptions, bad: list[BadInput]) -> None:
    if options.strict and bad:
        listed = "\n".join(f"  {b.file}: {b.reason}" for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise PrepareError(f"--strict: {len(bad)} bad input(s):\n{listed}{more}")


def _reasons(bad: list[BadInput], most: int = 4, examples: int = 2) -> str:
    """The skipped inputs' reasons, counted, each with a few of its files: `: 58 not an image file
    (suffix .txt), e.g. a.txt, b.txt; 2 ...`."""
    if not bad:
        return ""
    by_reason: dict[str, list[str]] = {}
    for entry in bad:
        by_reason.setdefault(entry.reason, []).append(Path(entry.file).name)
    ranked = sorted(by_reason.items(), key=lambda pair: -len(pair[1]))
    shown = "; ".join(f"{len(files)} {reason}, e.g. {', '.join(files[:examples])}" for reason, files in ranked[:most])
    more = f"; and {len(ranked) - most} other reason(s)" if len(ranked) > most else ""
    return f": {shown}{more}"


@dataclass
class _Row:
    id: str
    source: str
    group: str
    labels: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    shape: tuple[int, int]


_CHUNK = 64  # images per decode task: big enough to amortise a task, small enough for a smooth bar


def _decode_chunk(
    job: tuple[list[Item], int, str, int | None, Path],
) -> list[tuple[str, list[tuple[str, tuple[str, ...], tuple[int, int]]], int | None] | str]:
    """Decode a run of items in a worker; the pixels go straight to a staging Parquet file, so
    only small metadata travels back to the parent (shipping pixels through the pool's pipe
    made two workers slower than one)."""
    items, size, fit, bit_depth, path = job
    pixels: list[bytes] = []
    results = []
    for item in items:
        result = decode_or_reason((item, size, fit, bit_depth))
        if isinstance(result, str):
            results.append(result)
            continue
        results.append((result.content_hash, [(o.suffix, o.labels, o.pixels.shape) for o in result.outputs],
                        result.bit_depth))
        pixels.extend(o.pixels.tobytes() for o in result.outputs)
    pq.write_table(pa.table({"pixels": pa.array(pixels, pa.binary())}), path)
    return results


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a decode worker is killed when the prepare that started it dies, however
    it dies (a SIGKILLed parent cannot shut its pool down, and orphans held their memory)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _decode_all(options: PrepareOptions, items: list[Item], staging: Path, catalog: Catalog, console: Console | None):
    """Decode every item in parallel into staging Parquet files; return the rows' metadata."""
    workers = options.workers or os.cpu_count() or 1
    staging.mkdir()
    jobs = [
        (items[start : start + _CHUNK], options.image_size, options.resolved_fit, options.bit_depth,
         staging / f"{start // _CHUNK:08d}.parquet")
        for start in range(0, len(items), _CHUNK)
    ]
    pool = None
    if workers > 1 and len(jobs) > 1:
        # fork on Linux: no re-import of the caller's main module, and workers start at once. The
        # pool is started before the progress bar's thread exists, so no lock is copied mid-hold.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
        results = pool.map(_decode_chunk, jobs)
    else:
        results = map(_decode_chunk, jobs)
    rows: list[_Row] = []
    depths: Counter[int] = Counter()  # deeper-than-8-bit images by the bit depth they were scaled by
    progress = Progress(
        TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=console is None,
    )
    try:
        with progress:
            task = progress.add_task("decode", total=len(items))
            for (chunk, *_), chunk_results in zip(jobs, results):
                for item, result in zip(chunk, chunk_results):
                    if isinstance(result, str):
                        catalog.skip(item.path, result)
                        _fail_if_strict(options, catalog.bad[-1:])
                        continue
                    content_hash, outputs, depth = result
                    if depth is not None:
                        depths[depth] += 1
                    for suffix, labels, shape in outputs:
                        rows.append(_Row(item.id + suffix, str(item.path), content_hash, labels, item.meta, shape))
                progress.advance(task, len(chunk))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows, depths


def _common_shape(rows: list[_Row], catalog: Catalog, options: PrepareOptions) -> tuple[tuple[int, int], np.ndarray]:
    """The dataset's one image shape, and which rows have it. Only `keep` can disagree."""
    if not rows:
        raise PrepareError(f"{options.source}: no image could be read; see the skipped inputs")
    shape = Counter(row.shape for row in rows).most_common(1)[0][0]
    usable = np.array([row.shape == shape for row in rows])
    mismatched = [
        BadInput(row.source, f"stored shape {row.shape} differs from the dataset's {shape} under --fit keep; use --fit "
                             "pad or tile")
        for row, ok in zip(rows, usable)
        if not ok
    ]
    _fail_if_strict(options, mismatched)
    catalog.bad.extend(mismatched)
    return shape, usable


def _conflicting_labels(rows: list[_Row], usable: np.ndarray, catalog: Catalog, options: PrepareOptions) -> np.ndarray:
    """Leave out every copy of an image whose identical copies carry different labels (the same
    file in two class folders, `./img/a.jpg` beside `img/a.jpg` in a manifest with other labels):
    which labels are true is the user's call, and storing both would teach the model both."""
    labels: dict[str, set[tuple[str, ...]]] = {}
    sources: dict[str, list[str]] = {}
    for row, ok in zip(rows, usable):
        if ok and "#t" not in row.id:
            labels.setdefault(row.group, set()).add(row.labels)
            sources.setdefault(row.group, []).append(row.source)
    conflicted = {group for group, sets in labels.items() if len(sets) > 1}
    bad = []
    for group in sorted(conflicted):
        shown = " vs ".join(sorted(";".join(s) or "(defect-free)" for s in labels[group]))
        for source in sources[group]:
            others = ", ".join(s for s in sources[group] if s != source)
            bad.append(BadInput(source, f"identical bytes to {others} but labelled differently ({shown}); label the "
                                        "image once"))
    _fail_if_strict(options, bad)
    catalog.bad.extend(bad)
    return usable & np.array([row.group not in conflicted for row in rows], dtype=bool)


def _check_class_names(classes: list[str], catalog: Catalog, source) -> None:
    """Refuse class names that would split one class in two or break the files they end up in
    (a `/` turns predict's column `prob/<class>` into a path), naming where the first image carrying
    the name got it (its XML, manifest line or folder)."""
    for name in classes:
        if not name.strip() or any(ch in name for ch in ",;/\\\n\r\t") or not name.isprintable():
            where = next((item.origin or item.path for item in catalog.items if name in item.labels), source)
            raise PrepareError(f"{where}: class name {name!r} is empty or holds a separator (, ; / \\), a line break "
                               "or another unprintable character; rename it")
    folded: dict[str, str] = {}
    for name in classes:
        other = folded.setdefault(name.strip().casefold(), name)
        if other != name:
            raise PrepareError(f"{source}: classes {other!r} and {name!r} differ only in case or spaces; "
                               "name one class one way (or list the one you mean with --classes)")


def _assign_splits(rows: list[_Row], usable: np.ndarray, classes: list[str], options: PrepareOptions,
                   meta_columns: tuple[str, ...]) -> np.ndarray:
    """Split per group (duplicates and tiles of one source stay together); -1 for unusable rows."""
    stratify_by = (options.stratify_by if options.stratify_by is not None
                   else (("cell_type",) if options.format == "elpv" else ()))
    missing = [c for c in stratify_by if c not in meta_columns]
    if missing:
        raise PrepareError(f"--stratify-by {missing}: no such metadata column; this dataset has {list(meta_columns)}")
    groups = sorted({row.group for row, ok in zip(rows, usable) if ok})
    index = {g: i for i, g in enumerate(groups)}
    strata = sorted({dict(row.meta)[c] + "\0" + c for row in rows for c in stratify_by})
    # Columns: classes (guaranteed in val/test), defect-free, then one-hot metadata strata.
    y = np.zeros((len(groups), len(classes) + 1 + len(strata)), dtype=np.int64)
    for row, ok in zip(rows, usable):
        if not ok:
            continue
        g = index[row.group]
        for label in row.labels:
            y[g, classes.index(label)] = 1
        if not row.labels:
            y[g, len(classes)] = 1
        for c in stratify_by:
            y[g, len(classes) + 1 + strata.index(dict(row.meta)[c] + "\0" + c)] = 1
    group_split = stratified_split(y, options.split, options.seed, guaranteed=len(classes))
    return np.array([group_split[index[row.group]] if ok else -1 for row, ok in zip(rows, usable)])


def _write_shards(staging: Path, rows: list[_Row], split_of: np.ndarray, classes: list[str], meta_columns, tmp: Path,
                  options: PrepareOptions) -> dict:
    files = sorted(staging.glob("*.parquet"))  # chunk order is item order, as `rows` is
    pixels = pa.chunked_array([pq.read_table(f, memory_map=True).column("pixels").combine_chunks() for f in files],
                              pa.binary())
    label_type = pa.list_(pa.uint8(), len(classes))
    rng = np.random.default_rng(options.seed)
    shards: dict[str, list[dict]] = {}
    for code, name in enumerate(SPLITS):
        members = rng.permutation(np.flatnonzero(split_of == code))
        shards[name] = []
        (tmp / name).mkdir()
        for start in range(0, len(members), options.shard_rows):
            chosen = members[start : start + options.shard_rows]
            picked = [rows[i] for i in chosen]
            columns = {
                "id": pa.array([r.id for r in picked], pa.string()),
                "source": pa.array([r.source for r in picked], pa.string()),
                "split": pa.array([name] * len(picked), pa.string()),
                "group": pa.array([r.group for r in picked], pa.string()),
                "pixels": pixels.take(pa.array(chosen)),
                "height": pa.array([r.shape[0] for r in picked], pa.int32()),
                "width": pa.array([r.shape[1] for r in picked], pa.int32()),
                "labels": pa.array([[int(c in r.labels) for c in classes] for r in picked], label_type),
            }
            for column in meta_columns:
                columns[f"meta_{column}"] = pa.array([dict(r.meta).get(column, "") for r in picked], pa.string())
            relative = f"{name}/part-{len(shards[name]):05d}.parquet"
            pq.write_table(pa.table(columns), tmp / relative, row_group_size=128)
            shards[name].append({"file": relative, "rows": len(picked), "sha256": _sha256(tmp / relative)})
    return shards


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_stats(rows: list[_Row], split_of: np.ndarray, classes: list[str]) -> dict:
    stats = {}
    for code, name in enumerate(SPLITS):
        members = [rows[i] for i in np.flatnonzero(split_of == code)]
        stats[name] = {
            "images": len(members),
            "positives": {c: sum(c in r.labels for r in members) for c in classes},
            "defect_free": sum(not r.labels for r in members),
            "multi_label": sum(len(r.labels) > 1 for r in members),
        }
    return stats


def _fingerprint(rows: list[_Row], split_of: np.ndarray) -> str:
    """Names the data a model was trained on: ids, content, labels and splits of every stored image."""
    digest = hashlib.sha256()
    for row, code in sorted(zip(rows, split_of), key=lambda pair: pair[0].id):
        if code >= 0:
            digest.update(f"{row.id}\t{row.group}\t{';'.join(row.labels)}\t{SPLITS[code]}\n".encode())
    return "sha256:" + digest.hexdigest()


def prepare(options: PrepareOptions, console: Console | None = None) -> dict:
    """Run the whole preparation; returns meta.json's content. `console` shows progress."""
    options.validate()
    check_out_dir(options)  # before the lock: refusals that need no write come first
    with lock_out(options.out.absolute(), options.command or "prepare"), terminate_as_exit():
        check_out_dir(options)  # again, now that no other prepare can change --out
        try:
            return _prepare(options, console)
        except OSError as error:
            if (line := environment_error(error)) is None:
                raise
            raise PrepareError(f"{line} (while preparing --out {options.out}: nothing was replaced there)") from None


def _prepare(options: PrepareOptions, console: Console | None) -> dict:
    started = time.perf_counter()
    catalog = read_catalog(options)
    classes = _apply_classes(catalog, options.classes)
    _check_class_names(classes, catalog, options.source)
    _fail_if_strict(options, catalog.bad)
    if not catalog.items:
        raise PrepareError(f"{options.source}: no usable images found ({len(catalog.bad)} "
                           f"skipped{_reasons(catalog.bad)})")

    items, long_tail = catalog.items, None
    if options.long_tail is not None:
        long_tail = long_tail_subsample([item.labels for item in items], classes, options.long_tail, options.seed)
        items = [items[i] for i in long_tail.keep]

    out = options.out.absolute()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    clear_dead_staging(out, console)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        decode_started = time.perf_counter()
        rows, depths = _decode_all(options, items, tmp / "staging", catalog, console)
        decode_seconds = time.perf_counter() - decode_started
        shape, usable = _common_shape(rows, catalog, options)
        usable = _conflicting_labels(rows, usable, catalog, options)
        split_of = _assign_splits(rows, usable, classes, options, catalog.meta_columns)
        shards = _write_shards(tmp / "staging", rows, split_of, classes, catalog.meta_columns, tmp, options)
        shutil.rmtree(tmp / "staging")
        stats = _split_stats(rows, split_of, classes)
        for name in SPLITS:
            stats[name]["shards"] = shards[name]
        with open(tmp / "bad_inputs.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "reason"])
            writer.writerows((b.file, b.reason) for b in catalog.bad)
        stored = [row for row, code in zip(rows, split_of) if code >= 0]
        group_sizes = Counter(row.group for row in stored if "#t" not in row.id)
        meta = {
            "format_version": META_FORMAT_VERSION,
            "defect_tune_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": options.command,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
                        if k != "command"},
            "source": {"format": options.format, "path": str(options.source.absolute()) if options.source else None},
            "source_fingerprint": _fingerprint(rows, split_of),
            "classes": classes,
            "image": {"height": shape[0], "width": shape[1], "channels": 1, "dtype": "uint8",
                      "fit": options.resolved_fit, "bit_depth": options.bit_depth,
                      "deep_images_by_bit_depth": {str(d): n for d, n in sorted(depths.items())}},
            "metadata_columns": list(catalog.meta_columns),
            "images": len(stored),
            "positives": {c: sum(c in r.labels for r in stored) for c in classes},
            "multi_label_images": sum(len(r.labels) > 1 for r in stored),
            "defect_free_images": sum(not r.labels for r in stored),
            "duplicates": {
                "groups": sum(1 for n in group_sizes.values() if n > 1),
                "images": sum(n for n in group_sizes.values() if n > 1),
            },
            "long_tail": None if long_tail is None else {"ratio": options.long_tail, "target": long_tail.target,
                                                         "kept": long_tail.kept},
            "split_fractions": dict(zip(SPLITS, options.split)),
            "splits": stats,
            "bad_inputs": len(catalog.bad),
            "throughput": {
                "source_images": len(items),
                "decode_seconds": round(decode_seconds, 3),
                "images_per_second": round(len(items) / decode_seconds, 1) if decode_seconds > 0 else None,
                "total_seconds": round(time.perf_counter() - started, 3),
                "workers": options.workers or os.cpu_count() or 1,
            },
        }
        text = json.dumps(meta, indent=2) + "\n"
        (tmp / "meta.json").write_text(text)
        swap_in(tmp, out, options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads(text)  # exactly what later stages will read


def summary_table(meta: dict) -> Table:
    table = Table(title=f"{meta['images']} images, {len(meta['classes'])} classes, "
                        f"{meta['image']['height']}x{meta['image']['width']}")
    table.add_column("class")
    for name in SPLITS:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    if meta["long_tail"]:
        table.add_column("long-tail target", justify="right")
    for c in meta["classes"]:
        cells = [str(meta["splits"][s]["positives"][c]) for s in SPLITS] + [str(meta["positives"][c])]
        if meta["long_tail"]:
            cells.append(str(meta["long_tail"]["target"][c]))
        table.add_row(c, *cells)
    table.add_section()
    for label, key in (("defect-free", "defect_free"), ("multi-label", "multi_label"), ("images", "images")):
        cells = [str(meta["splits"][s][key]) for s in SPLITS]
        total = {"defect_free": meta["defect_free_images"], "multi_label": meta["multi_label_images"],
                 "images": meta["images"]}[key]
        table.add_row(label, *cells, str(total), *([""] if meta["long_tail"] else []))
    throughput = meta["throughput"]
    table.caption = (
        f"skipped {meta['bad_inputs']} (bad_inputs.csv) · duplicate groups {meta['duplicates']['groups']} · "
        f"decoded {throughput['source_images']} images at {throughput['images_per_second']} images/s "
        f"on {throughput['workers']} workers"
    )
    depths = meta["image"].get("deep_images_by_bit_depth") or {}
    if len(depths) > 1 and meta["image"].get("bit_depth") is None:
        used = ", ".join(f"{depth}-bit ({count})" for depth, count in depths.items())
        table.caption += (f"\n16-bit images scaled by each image's own bit depth: {used}; the dimmer ones were "
                          f"brightened: pass --bit-depth with the sensor's depth to scale them alike")
    return table
