import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NEU_DET, balanced_labels, make_voc, needs_neu_det, voc_xml, write_image

from defect_tune.data.prepare import PrepareError, PrepareOptions, prepare

SPLITS = ("train", "val", "test")


def run(source, out, fmt="voc", **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("image_size", 16)
    return prepare(PrepareOptions(source=source, format=fmt, out=out, **kwargs))


def read_split(out: Path, split: str):
    return pq.read_table(out / split).to_pylist()


def bad_inputs(out: Path) -> dict[str, str]:
    with open(out / "bad_inputs.csv", newline="") as handle:
        return {Path(row["file"]).name: row["reason"] for row in csv.DictReader(handle)}


def test_voc_end_to_end_shards_agree_with_meta(small_voc, tmp_path):
    out = tmp_path / "out"
    meta = run(small_voc, out, shard_rows=7)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["crack", "dark_area", "scratch"]
    assert meta["image"] == {"height": 16, "width": 16, "channels": 1, "dtype": "uint8", "fit": "pad",
                             "bit_depth": None, "deep_images_by_bit_depth": {}}
    rows = {s: read_split(out, s) for s in SPLITS}
    assert sum(len(r) for r in rows.values()) == meta["images"] == 42
    for split in SPLITS:
        stats = meta["splits"][split]
        assert stats["images"] == len(rows[split])
        assert sum(shard["rows"] for shard in stats["shards"]) == len(rows[split])
        assert all((out / shard["file"]).is_file() for shard in stats["shards"])
        for ci, name in enumerate(meta["classes"]):
            assert stats["positives"][name] == sum(r["labels"][ci] for r in rows[split]) >= 1
        assert all(r["split"] == split and len(r["pixels"]) == 16 * 16 for r in rows[split])
    assert len(meta["splits"]["train"]["shards"]) >= 3  # shard_rows=7
    assert meta["multi_label_images"] == 9 and meta["defect_free_images"] == 6
    by_id = {r["id"]: r for split in rows.values() for r in split}
    assert by_id["crack_000"]["labels"] == [1, 1, 0]  # crack + the next class, dark_area
    assert by_id["clean_0"]["labels"] == [0, 0, 0]
    assert meta["source_fingerprint"].startswith("sha256:")


def test_pixels_are_the_decoded_image(tmp_path):
    root = make_voc(tmp_path / "voc", {f"i{k}": ["a"] for k in range(6)}, size=(16, 16))
    out = tmp_path / "out"
    run(root, out)
    row = read_split(out, "train")[0]
    source = np.asarray(__import__("PIL.Image").Image.open(row["source"]).convert("L"))
    stored = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"])
    assert np.array_equal(stored, source)  # 16 px in, 16 px out: no resampling


def test_same_seed_same_output_and_parallel_decode_matches_serial(small_voc, tmp_path):
    a = run(small_voc, tmp_path / "a", workers=1)
    b = run(small_voc, tmp_path / "b", workers=2)
    assert a["source_fingerprint"] == b["source_fingerprint"]
    for split in SPLITS:
        assert read_split(tmp_path / "a", split) == read_split(tmp_path / "b", split)
    c = run(small_voc, tmp_path / "c", seed=1)
    assert c["source_fingerprint"] != a["source_fingerprint"]  # other split


def test_exact_duplicates_never_straddle_splits(tmp_path):
    labels = balanced_labels(["a", "b"], per_class=15)
    root = make_voc(tmp_path / "voc", labels)
    images = root / "JPEGImages"
    for k in range(1, 15):  # a_001..a_014 become byte copies of a_000
        (images / f"a_{k:03d}.jpg").write_bytes((images / "a_000.jpg").read_bytes())
    out = tmp_path / "out"
    meta = run(root, out)
    assert meta["duplicates"] == {"groups": 1, "images": 15}
    splits_of_copies = {r["split"] for s in SPLITS for r in read_split(out, s) if r["id"].startswith("a_")}
    assert len(splits_of_copies) == 1


def test_bad_inputs_are_skipped_listed_and_counted(small_voc, tmp_path):
    images = small_voc / "JPEGImages"
    (images / "crack_001.jpg").write_bytes(b"not an image")
    (images / "crack_002.jpg").unlink()
    (small_voc / "Annotations" / "crack_003.xml").write_text("<annotation>")
    out = tmp_path / "out"
    meta = run(small_voc, out)
    found = bad_inputs(out)
    assert "cannot decode" in found["crack_001.jpg"]
    assert "not found" in found["crack_002.xml"]
    assert "malformed XML" in found["crack_003.xml"]
    assert "no annotation" in found["crack_003.jpg"]
    assert meta["bad_inputs"] == len(found) == 4
    assert meta["images"] == 42 - 3


def test_strict_fails_naming_the_file(small_voc, tmp_path):
    (small_voc / "JPEGImages" / "dark_area_004.jpg").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match="dark_area_004.jpg: cannot decode"):
        run(small_voc, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.tmp-*")) == []  # nothing half-written left behind


def test_a_bad_box_skips_its_image_and_strict_refuses_it(small_voc, tmp_path):
    annotations = small_voc / "Annotations"
    (annotations / "crack_005.xml").write_text(voc_xml("crack_005.jpg", [("crack", (20, 2, 5, 22))]))
    (annotations / "scratch_006.xml").write_text(
        "<annotation><filename>scratch_006.jpg</filename><object><name>scratch</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><ymax>5</ymax></bndbox></object></annotation>"
    )
    out = tmp_path / "out"
    meta = run(small_voc, out)
    assert bad_inputs(out) == {  # listed once, under the XML; the image is not also "without annotation"
        "crack_005.xml": "bad <object>: <bndbox> is inverted: [20, 2, 5, 22]",
        "scratch_006.xml": "bad <object>: <bndbox> has no <xmax>",
    }
    assert meta["bad_inputs"] == 2 and meta["images"] == 42 - 2
    ids = {r["id"] for s in SPLITS for r in read_split(out, s)}
    assert not {"crack_005", "scratch_006"} & ids
    with pytest.raises(PrepareError,
                       match=re.escape("crack_005.xml: bad <object>: <bndbox> is inverted: [20, 2, 5, 22]")):
        run(small_voc, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and list(tmp_path.glob(".strict.tmp-*")) == []


def test_mixed_shapes_under_fit_keep_are_skipped_and_strict_refuses_them(tmp_path):
    root = make_voc(tmp_path / "voc", balanced_labels(["a", "b"], per_class=6), size=(16, 32))
    for k in range(2):  # square among 1:2 frames: under --fit keep they cannot share one shape
        write_image(root / "JPEGImages" / f"square_{k}.jpg", 100 + k, size=(16, 16))
        (root / "Annotations" / f"square_{k}.xml").write_text(voc_xml(f"square_{k}.jpg", [("a", (2, 2, 14, 14))],
                                                                      (16, 16)))
    out = tmp_path / "out"
    meta = run(root, out, fit="keep", image_size=8)
    assert (meta["image"]["height"], meta["image"]["width"], meta["image"]["fit"]) == (8, 16, "keep")
    reason = "stored shape (8, 8) differs from the dataset's (8, 16) under --fit keep; use --fit pad or tile"
    assert bad_inputs(out) == {"square_0.jpg": reason, "square_1.jpg": reason}
    assert meta["bad_inputs"] == 2 and meta["images"] == 12
    rows = [r for s in SPLITS for r in read_split(out, s)]
    assert len(rows) == 12 and {(r["height"], r["width"]) for r in rows} == {(8, 16)}
    with pytest.raises(PrepareError, match=re.escape("square_0.jpg: " + reason)):
        run(root, tmp_path / "strict", fit="keep", image_size=8, strict=True)
    assert not (tmp_path / "strict").exists() and list(tmp_path.glob(".strict.tmp-*")) == []


def test_unknown_class_under_classes_is_skipped_not_relabelled(small_voc, tmp_path):
    out = tmp_path / "out"
    meta = run(small_voc, out, classes=("scratch", "crack"))
    assert meta["classes"] == ["scratch", "crack"]
    found = bad_inputs(out)
    assert any("unknown class 'dark_area'" in reason for reason in found.values())
    ids = {r["id"] for s in SPLITS for r in read_split(out, s)}
    assert not any(i.startswith("dark_area") for i in ids)
    assert "crack_000" not in ids  # carries dark_area too, so it is skipped whole


def test_second_prepare_refuses_unless_overwrite(small_voc, tmp_path):
    out = tmp_path / "out"
    run(small_voc, out)
    with pytest.raises(PrepareError, match="--overwrite"):
        run(small_voc, out)
    meta = run(small_voc, out, overwrite=True, image_size=8)
    assert meta["image"]["height"] == 8
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(PrepareError, match="mine: no meta.json; --overwrite only replaces an earlier prepare's output"):
        run(small_voc, foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    (out / "notes.txt").write_text("mine")  # an earlier output that a user has added to
    with pytest.raises(PrepareError, match="out: it holds files prepare did not write: notes.txt"):
        run(small_voc, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "meta.json").is_file()


def test_overwrite_never_replaces_the_source_or_a_folder_that_holds_it(small_voc, tmp_path):
    """What deleted a user's raw data: --out the source itself, or a parent of it, holding a
    meta.json. Refused, whatever that meta.json says, and the source is left as it was."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    (small_voc / "meta.json").write_text("{}")
    for out in (small_voc, tmp_path):
        with pytest.raises(PrepareError, match="--out holds the source"):
            run(small_voc, out, overwrite=True)
    nested = small_voc / "prepared"
    run(small_voc, nested)  # a new folder inside the source is fine ...
    with pytest.raises(PrepareError, match="--overwrite would replace a folder inside the source"):
        run(small_voc, nested, overwrite=True)  # ... replacing one there is not
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if nested not in p.parents and p != nested)
    assert after == sorted([*before, (small_voc / "meta.json").relative_to(tmp_path)])


def test_a_dead_prepares_staging_folder_is_removed_and_a_live_ones_kept(small_voc, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.tmp-{dead.pid}" / "staging").mkdir(parents=True)
    alive = tmp_path / f".out.tmp-{os.getppid()}"  # pytest's parent: a live process that is not this one
    alive.mkdir()
    run(small_voc, out)
    assert not (tmp_path / f".out.tmp-{dead.pid}").exists() and alive.is_dir() and (out / "meta.json").is_file()


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "voc" / "Annotations").mkdir()
    with pytest.raises(PrepareError, match="no usable images"):
        run(tmp_path / "voc", tmp_path / "out")


def test_option_errors(small_voc, tmp_path):
    with pytest.raises(PrepareError, match="sum to 1"):
        run(small_voc, tmp_path / "o", split=(0.5, 0.2, 0.2))
    with pytest.raises(PrepareError, match="--fit"):
        run(small_voc, tmp_path / "o", fit="stretch")
    with pytest.raises(PrepareError, match="twice"):
        run(small_voc, tmp_path / "o", classes=("a", "a"))
    with pytest.raises(PrepareError, match="stratify-by"):
        run(small_voc, tmp_path / "o", stratify_by=("cell_type",))
    with pytest.raises(PrepareError, match="--image-size must be between 8 and 8192 pixels, got 7"):
        run(small_voc, tmp_path / "o", image_size=7)
    with pytest.raises(PrepareError, match="--shard-rows must be at least 1, got 0"):
        run(small_voc, tmp_path / "o", shard_rows=0)
    assert not (tmp_path / "o").exists()


def test_severstal_keeps_aspect_ratio_and_tiles_get_their_own_labels(tmp_path):
    root = tmp_path / "sev"
    rows = ["ImageId,ClassId,EncodedPixels"]
    height, width = 16, 100
    for k in range(12):
        write_image(root / "train_images" / f"s{k}.jpg", k, size=(height, width))
        cls = 1 + k % 3
        rows.append(f"s{k}.jpg,{cls},{5 * height + 1} {3 * height}")  # columns 5-7: the first tile only
    for k in range(12, 15):
        write_image(root / "train_images" / f"s{k}.jpg", k, size=(height, width))
    (root / "train.csv").write_text("\n".join(rows) + "\n")

    meta = run(root, tmp_path / "keep", fmt="severstal", image_size=8)
    assert meta["image"]["fit"] == "keep" and (meta["image"]["height"], meta["image"]["width"]) == (8, 50)
    assert meta["classes"] == ["class_1", "class_2", "class_3"] and meta["defect_free_images"] == 3

    meta = run(root, tmp_path / "tile", fmt="severstal", image_size=16, fit="tile")
    assert (meta["image"]["height"], meta["image"]["width"]) == (16, 16)
    rows = [r for s in SPLITS for r in read_split(tmp_path / "tile", s)]
    assert len(rows) == 15 * 7  # 100 px: six 16-px tiles plus one flush with the edge
    labelled = {r["id"] for r in rows if any(r["labels"])}
    assert labelled == {f"s{k}#t0" for k in range(12)}
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_source.values())  # tiles of a frame stay together


def test_folders_csv_and_elpv_formats(tmp_path):
    for k in range(9):
        write_image(tmp_path / "folders" / "def_front" / f"d{k}.png", k)
        write_image(tmp_path / "folders" / "ok_front" / f"o{k}.png", 100 + k)
    meta = run(tmp_path / "folders", tmp_path / "o1", fmt="folders", defect_free_folders=("ok_front",))
    assert meta["classes"] == ["def_front"] and meta["defect_free_images"] == 9

    lines = ["path,labels,line"]
    for k in range(12):
        write_image(tmp_path / "m" / f"{k}.png", 200 + k)
        lines.append(f"{k}.png,{'crack;scratch' if k % 3 == 0 else 'crack' if k % 3 == 1 else ''},L{k % 2}")
    (tmp_path / "m" / "manifest.csv").write_text("\n".join(lines) + "\n")
    meta = run(tmp_path / "m" / "manifest.csv", tmp_path / "o2", fmt="csv", stratify_by=("line",))
    assert meta["positives"] == {"crack": 8, "scratch": 4}
    assert meta["metadata_columns"] == ["line"]
    assert {r["meta_line"] for r in read_split(tmp_path / "o2", "train")} == {"L0", "L1"}

    elpv = tmp_path / "elpv"
    text = []
    for k in range(20):
        write_image(elpv / "images" / f"cell{k:04d}.png", 300 + k)
        text.append(f"images/cell{k:04d}.png  {[0.0, 1 / 3, 2 / 3, 1.0][k % 4]}  {'mono' if k < 10 else 'poly'}")
    (elpv / "labels.csv").write_text("\n".join(text) + "\n")
    meta = run(elpv, tmp_path / "o3", fmt="elpv")
    assert meta["classes"] == ["defective"] and meta["positives"] == {"defective": 10}
    for split in SPLITS:  # the cell type is stratified: both types in every split
        assert {r["meta_cell_type"] for r in read_split(tmp_path / "o3", split)} == {"mono", "poly"}


def test_synthetic_default_is_written_as_voc_and_read_back(tmp_path):
    meta = run(tmp_path / "raw", tmp_path / "out", fmt="synthetic", image_size=32, synthetic_images=120)
    assert (tmp_path / "raw" / "Annotations").is_dir() and (tmp_path / "raw" / "JPEGImages").is_dir()
    assert meta["images"] == 120 and meta["source"]["format"] == "synthetic"
    assert meta["image"]["height"] == 32
    assert len(meta["classes"]) >= 4


@needs_neu_det
def test_neu_det_counts_classes_and_splits(tmp_path):
    meta = run(NEU_DET, tmp_path / "neu", image_size=32, workers=2)
    assert meta["images"] == 1800 and meta["bad_inputs"] == 0
    assert meta["classes"] == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert meta["positives"] == {
        "crazing": 300, "inclusion": 382, "patches": 342,
        "pitted_surface": 301, "rolled-in_scale": 300, "scratches": 300,
    }
    assert meta["multi_label_images"] == 123
    for split in SPLITS:
        assert all(n > 0 for n in meta["splits"][split]["positives"].values())
    assert [meta["splits"][s]["images"] for s in SPLITS] == pytest.approx([1260, 270, 270], abs=15)
    assert meta["image"]["height"] == meta["image"]["width"] == 32


@needs_neu_det
def test_neu_det_long_tail_follows_the_ratio(tmp_path):
    meta = run(NEU_DET, tmp_path / "lt", image_size=16, workers=2, long_tail=50)
    counts = sorted(meta["positives"].values(), reverse=True)
    assert meta["long_tail"]["kept"] == meta["long_tail"]["target"] == meta["positives"]
    assert counts[-1] == round(counts[0] / 50)
    profile = [counts[0] * 50 ** (-i / 5) for i in range(6)]
    assert counts == [round(p) for p in profile]
    for split in SPLITS:  # even the rarest class (6 images) reaches val and test
        assert all(n > 0 for n in meta["splits"][split]["positives"].values())


def test_decode_workers_die_with_a_killed_prepare_and_the_next_run_clears_its_staging(tmp_path):
    """SIGKILL leaves no cleanup to run: the workers must not live on as orphans holding their
    memory, and the staging folder is removed by the next prepare of the same --out."""
    import psutil

    out = tmp_path / "out"
    command = [sys.executable, "-m", "defect_tune", "prepare", str(tmp_path / "voc"), "--format", "synthetic",
               "--out", str(out), "--image-size", "96", "--synthetic-images", "4000", "--workers", "2"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    workers: list = []
    while not workers and parent.poll() is None and time.monotonic() < deadline:
        workers = [c for c in psutil.Process(parent.pid).children() if c.is_running()]
        time.sleep(0.2)
    assert workers, "prepare ended before its decode workers were seen"
    staging = tmp_path / f".out.tmp-{parent.pid}"
    assert staging.is_dir()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"decode workers outlived their killed parent: {[p.pid for p in alive]}"
    assert staging.is_dir()  # nothing could remove it ...
    done = subprocess.run([*command[:-2], "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not staging.exists() and f"removed {staging}" in done.stderr.replace("\n", "")  # ... until the next run


def _prepare_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "defect_tune", "prepare", str(source), "--format", "synthetic", "--out", str(out),
            "--image-size", "64", "--synthetic-images", "3000", "--workers", "1", *extra]


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"prepare ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def test_two_concurrent_prepares_of_one_out_the_second_is_refused_naming_the_first(tmp_path):
    """The second run is refused at once, naming the first's process; the first, held still
    meanwhile (SIGSTOP, so the overlap is certain), then finishes and its output is whole."""
    out = tmp_path / "out"
    first = subprocess.Popen(_prepare_command(tmp_path / "voc", out), stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.lock"
    _wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"process {first.pid} "), first, "lock")
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(_prepare_command(tmp_path / "voc2", out), capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert (f"{out}: another prepare is writing this --out (process {first.pid} started "
            in " ".join(second.stderr.split()))
    _, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    meta = json.loads((out / "meta.json").read_text())
    assert meta["images"] == 3000 and str(tmp_path / "voc") in meta["command"] and "voc2" not in meta["command"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "voc"]  # no lock, staging or second source left


def test_sigterm_mid_run_leaves_the_earlier_output_as_it_was_and_a_rerun_replaces_it(tmp_path):
    out = tmp_path / "out"
    subprocess.run(_prepare_command(tmp_path / "earlier", out, "--seed", "1"), check=True, capture_output=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stopped = subprocess.Popen(_prepare_command(tmp_path / "voc", out, "--overwrite"), stderr=subprocess.PIPE,
                               text=True)
    staging = lambda: any((p / "staging").is_dir() for p in tmp_path.glob(".out.tmp-*"))  # noqa: E731 - decoding has begun
    _wait_for(staging, stopped, "staging folder")
    stopped.send_signal(signal.SIGSTOP)  # between two polls it may not have got far: hold it where it is
    stopped.send_signal(signal.SIGTERM)
    stopped.send_signal(signal.SIGCONT)
    _, errors = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGTERM and "Traceback" not in errors, errors
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # its staging folder and lock went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out", "voc"]
    rerun = subprocess.run(_prepare_command(tmp_path / "voc", out, "--overwrite"), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "meta.json").read_text())["options"]["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out", "voc"]


def test_a_full_disk_mid_run_is_one_line_naming_the_file_and_leaves_out_and_its_folder_as_they_were(
        small_voc, tmp_path, monkeypatch):
    """The disk fills while shards are written: the error names the file and the cause, --out
    keeps the earlier output, and neither staging nor lock is left beside it."""
    import errno

    import pyarrow.parquet

    out = tmp_path / "out"
    run(small_voc, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    listing = sorted(p.name for p in tmp_path.iterdir())

    def full(table, where, **options):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pyarrow.parquet, "write_table", full)
    with pytest.raises(PrepareError, match=r"\.parquet: No space left on device; free some space or write "
                                           r"elsewhere \(while preparing --out .*out: nothing was replaced there\)"):
        run(small_voc, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
