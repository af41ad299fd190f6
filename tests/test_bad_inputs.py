"""Bad inputs through the real command line, one subprocess each, as a careless or unlucky user
would type them. Each row asserts the exit code, no traceback, the file or option named in the
message, and that nothing outside the command's own output changed (checksums before and after).

The table below is also the "Command line" section of tests/BAD_INPUTS.md:
`python tests/test_bad_inputs.py` writes it there, and a test fails when the two differ.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

PAGE = Path(__file__).with_name("BAD_INPUTS.md")
BEGIN, END = "<!-- begin: tests/test_bad_inputs.py -->", "<!-- end: tests/test_bad_inputs.py -->"


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # what the user did, for BAD_INPUTS.md
    command: Callable[[dict], list[str]]  # the defect-tune arguments, from the workspace's paths
    says: str  # a part of the one-line message: it names the file or option and the problem
    code: int = 2
    setup: Callable[[dict], None] = lambda w: None
    listed: str | None = None  # the run succeeds and OUT/bad_inputs.csv lists this file with `says`
    changed: Callable[[dict], list[Path]] = lambda w: []  # paths the command may write (its --out)
    then: Callable[[dict, str], None] = lambda w, output: None  # more to assert once it ran


def _meta_json(w: dict, text: str) -> None:
    (w["tmp"] / "badmeta").mkdir()
    (w["tmp"] / "badmeta" / "meta.json").write_text(text)


def _model_json(w: dict, change: Callable[[dict], None]) -> None:
    path = w["model"] / "model.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info, allow_nan=True))


def _with_meta(w: dict) -> None:
    (w["raw"] / "meta.json").write_text("{}")


def _under_raw(w: dict) -> None:
    subprocess.run([sys.executable, "-m", "defect_tune", "prepare", str(w["raw"]), "--format", "folders",
                    "--out", str(w["raw"] / "prepared"), "--image-size", "16"], check=True, capture_output=True)


def _prepared_with_notes(w: dict) -> None:
    out = w["tmp"] / "prepared"
    subprocess.run([sys.executable, "-m", "defect_tune", "prepare", str(w["raw"]), "--format", "folders",
                    "--out", str(out), "--image-size", "16"], check=True, capture_output=True)
    (out / "notes.txt").write_text("what the line operator told me")


def _voc_tiles(w: dict) -> None:
    """Wide images for --fit tile; one box lies wholly left of its image (negative coordinates)."""
    from conftest import voc_xml

    root = w["tmp"] / "voc"
    (root / "Annotations").mkdir(parents=True)
    for k in range(10):
        write_image(root / "JPEGImages" / f"w{k}.png", 300 + k, size=(24, 72))
        box = (-30, 2, -5, 20) if k == 0 else (2, 2, 20, 20)
        (root / "Annotations" / f"w{k}.xml").write_text(voc_xml(f"w{k}.png", [("crack", box)], size=(24, 72)))


def _float_tiff_with_nan(w: dict) -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(w["raw"] / "crack" / "nan.tif")


def _same_bytes_two_folders(w: dict) -> None:
    (w["raw"] / "scratch" / "c0-copy.png").write_bytes((w["raw"] / "crack" / "c0.png").read_bytes())


def _class_folder(name: str, images: int = 2) -> Callable[[dict], None]:
    def make(w: dict) -> None:
        (w["raw"] / name).mkdir()
        for k in range(images):
            write_image(w["raw"] / name / f"x{k}.png", 400 + k)
    return make


def _manifest(w: dict, text: str, encoding: str = "utf-8") -> None:
    (w["raw"] / "labels.csv").write_bytes(text.encode(encoding))


def _manifest_with_label(label: str) -> Callable[[dict], None]:
    """A manifest whose first row carries `label` (a CSV field, quoted as needed), the rest plain."""
    return lambda w: _manifest(w, f"path,labels\ncrack/c0.png,{label}\n" + "".join(
        f"crack/c{k}.png,crack\nok/o{k}.png,\n" for k in range(1, 8)))


def _meta_edit(w: dict, change: Callable[[dict], None]) -> None:
    shutil.copytree(w["data"], w["tmp"] / "copy")
    meta = json.loads((w["tmp"] / "copy" / "meta.json").read_text())
    change(meta)
    (w["tmp"] / "copy" / "meta.json").write_text(json.dumps(meta))


def _meta_extra_class(w: dict) -> None:
    _meta_edit(w, lambda meta: meta["classes"].append("dent"))


def _board_edit(w: dict, change: Callable) -> None:
    import pandas as pd

    path = w["results"] / "leaderboard.parquet"
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def _file(w: dict) -> None:
    (w["tmp"] / "afile").write_text("not a folder")


def _prepared_with_split_file(w: dict) -> None:
    _prepared_with_notes(w)
    (w["tmp"] / "prepared" / "notes.txt").unlink()
    (w["tmp"] / "prepared" / "train" / "important.txt").write_text("a file a user keeps beside the shards")


def _linked_class(w: dict) -> None:
    """A class folder that is a symlink to a share elsewhere, as factory NAS layouts are."""
    elsewhere = w["tmp"] / "share" / "dent"
    for k in range(6):
        write_image(elsewhere / f"d{k}.png", 500 + k)
    (w["raw"] / "dent").symlink_to(elsewhere, target_is_directory=True)


def _class_linked_into_another(w: dict) -> None:
    """`crack/sc -> ../scratch`: every scratch image is now reachable as crack too."""
    (w["raw"] / "crack" / "sc").symlink_to("../scratch", target_is_directory=True)


def _fifo(path: Path) -> Callable[[dict], None]:
    return lambda w: os.mkfifo(path if path.is_absolute() else w["raw"] / path)


def _same_stem(w: dict) -> None:
    write_image(w["raw"] / "crack" / "c0.jpg", 800)


def _out_link(w: dict) -> None:
    (w["tmp"] / "real-out").mkdir()
    (w["tmp"] / "o").symlink_to(w["tmp"] / "real-out", target_is_directory=True)


def _webp_and_gif(w: dict) -> None:
    from PIL import Image

    for name, seed in (("a.webp", 600), ("b.gif", 601)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)).save(w["raw"] / "crack" / name)


def _deep_frames(w: dict) -> None:
    """A 12-bit sensor's frames in 16-bit PNGs, three of them dim (brightest under 2048)."""
    from PIL import Image

    for k in range(6):
        high = 1500 if k < 3 else 4095
        pixels = np.random.default_rng(700 + k).integers(0, high + 1, (24, 24)).astype(np.uint16)
        pixels[0, 0] = high
        Image.fromarray(pixels).save(w["raw"] / "crack" / f"deep{k}.png")


def _deep_frame_above(w: dict) -> None:
    from PIL import Image

    _deep_frames(w)
    Image.fromarray(np.full((24, 24), 5000, dtype=np.uint16)).save(w["raw"] / "crack" / "hot.png")


def _meta_value(name: str) -> Callable[[dict], None]:
    return lambda w: _meta_json(w, name)


def _messy_factory_folder(w: dict) -> None:
    """What a shared drive at a plant holds beside the images: OS droppings, notes, an empty and a
    cut-off file, an upper-case suffix, a subfolder, a WebP, a 12-bit PNG, one image copied into a
    second class folder, a class linked in from elsewhere and an empty class folder."""
    from PIL import Image

    raw = w["raw"]
    (raw / "crack" / "Thumbs.db").write_bytes(bytes(64))
    (raw / "scratch" / ".DS_Store").write_bytes(bytes(64))
    (raw / "scratch" / "notes from night shift.txt").write_text("lamp 3 flickers")
    (raw / "crack" / "empty.jpg").write_bytes(b"")
    whole = (raw / "crack" / "c1.png").read_bytes()
    (raw / "crack" / "cut.png").write_bytes(whole[: len(whole) // 2])
    write_image(raw / "crack" / "UPPER.PNG", 300)
    write_image(raw / "crack" / "line 2" / "nested.png", 301)
    write_image(raw / "scratch" / "s-copy.webp", 302)
    Image.fromarray(np.random.default_rng(5).integers(0, 4096, (24, 24)).astype(np.uint16)).save(raw / "scratch" / "deep12.png")
    (raw / "scratch" / "c0-again.png").write_bytes((raw / "crack" / "c0.png").read_bytes())
    elsewhere = w["tmp"] / "share" / "dent"
    for k in range(4):
        write_image(elsewhere / f"d{k}.png", 400 + k)
    (raw / "dent").symlink_to(elsewhere, target_is_directory=True)
    (raw / "empty class").mkdir()


def _messy_prepared(w: dict, output: str) -> None:
    with open(w["tmp"] / "o" / "bad_inputs.csv", newline="") as handle:
        listed = {Path(row["file"]).name: row["reason"] for row in csv.DictReader(handle)}
    conflict = "but labelled differently (crack vs scratch); label the image once"
    assert conflict in listed.pop("c0.png", "") and conflict in listed.pop("c0-again.png", ""), listed
    assert listed == {
        "Thumbs.db": "not an image file (suffix .db)",
        "notes from night shift.txt": "not an image file (suffix .txt)",
        "empty class": "class folder holds no images: the class would have no examples",
        "cut.png": "cannot decode image: image file is truncated",
        "empty.jpg": "cannot decode image: empty file (0 bytes)",
    }, listed
    meta = json.loads((w["tmp"] / "o" / "meta.json").read_text())
    # crack: c1..c7, UPPER.PNG, line 2/nested.png; scratch: s0..s7, the WebP, the 12-bit PNG.
    assert meta["positives"] == {"crack": 9, "dent": 4, "ok": 8, "scratch": 10}, meta["positives"]
    assert meta["image"]["deep_images_by_bit_depth"] == {"12": 1}


def _predicted(w: dict):
    import pandas as pd

    return pd.read_csv(w["tmp"] / "p.csv")


def _errors(w: dict, names: list[str]) -> None:
    table = _predicted(w)
    assert sorted(Path(p).name for p in table.loc[table["error"].notna(), "path"]) == names, table


def _positives(w: dict, name: str, count: int) -> None:
    assert json.loads((w["tmp"] / "o" / "meta.json").read_text())["positives"][name] == count


def _predicted_all(names: list[str]) -> Callable[[dict, str], None]:
    def check(w: dict, output: str) -> None:
        table = _predicted(w)
        rows = table[table["path"].map(lambda p: Path(p).name).isin(names)]
        assert len(rows) == len(names) and rows["error"].isna().all(), table
    return check


def _deep_scaled(depths: dict, bit_depth) -> Callable[[dict, str], None]:
    def check(w: dict, output: str) -> None:
        image = json.loads((w["tmp"] / "o" / "meta.json").read_text())["image"]
        assert image["deep_images_by_bit_depth"] == depths and image["bit_depth"] == bit_depth
    return check


def _nan_weights(w: dict) -> None:
    """The model directory's weights, every tensor NaN: the network answers NaN for any image."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = w["model"] / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    save_file({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state.items()}, str(path), metadata)


def _no_decisions(w: dict, output: str) -> None:
    table = _predicted(w)
    assert len(table) and table["error"].str.startswith("the model gave a non-finite probability").all(), table
    assert table.filter(like="pred/").isna().all().all() and table["defects"].isna().all(), table
    assert "with a defect predicted" not in output  # no summary that reads as "no defect" before the error


def _weights_without_record(w: dict) -> None:
    """Weights saved without the class list retrain records in them, as an older model directory's."""
    from safetensors.torch import load_file, save_file

    path = w["model"] / "model.safetensors"
    save_file(load_file(str(path)), str(path), {"format": "pt"})


def _one_class_less(info: dict) -> None:
    info["thresholds"].pop(info["classes"].pop())


def _severstal(w: dict, bad_row: str) -> None:
    """A Severstal folder of 16 frames, 8 with a class-1 mask; train.csv's line 2 is `bad_row`."""
    root = w["tmp"] / "sev"
    for k in range(16):
        write_image(root / "train_images" / f"im{k}.png", 800 + k)
    rows = "".join(f"im{k}.png,1,1 10\n" for k in range(1, 9))
    (root / "train.csv").write_text(f"ImageId,ClassId,EncodedPixels\n{bad_row}\n{rows}")


def _shard_with_label(value: int) -> Callable[[dict], None]:
    """The copied data's first train shard, its first row's first label set to `value`, and
    meta.json's hash of it updated (so that only the label is wrong)."""
    def edit(w: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        _meta_edit(w, lambda meta: None)
        meta = json.loads((w["tmp"] / "copy" / "meta.json").read_text())
        shard = meta["splits"]["train"]["shards"][0]
        path = w["tmp"] / "copy" / shard["file"]
        path.unlink()  # a copy of the symlinked data's file: replace it, never write through
        table = pq.read_table(w["data"] / shard["file"])
        labels = table.column("labels").to_pylist()
        labels[0] = [value, *labels[0][1:]]
        table = table.set_column(table.schema.get_field_index("labels"), "labels", pa.array(labels, table.schema.field("labels").type))
        pq.write_table(table, path)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (w["tmp"] / "copy" / "meta.json").write_text(json.dumps(meta))
    return edit


def _sweep_json(w: dict, change: Callable[[dict], None]) -> None:
    path = w["results"] / "sweep.json"
    sweep = json.loads(path.read_text())
    change(sweep)
    path.write_text(json.dumps(sweep))


def _text_only_folders(w: dict) -> None:
    for name in ("crack", "scratch"):
        for k in range(3):
            (w["tmp"] / "texts" / name).mkdir(parents=True, exist_ok=True)
            (w["tmp"] / "texts" / name / f"shift{k}.txt").write_text("lamp 3 flickers")


PREPARE = ["--format", "folders", "--image-size", "16"]

CASES = [
    # Data loss
    Case("prepare-out-is-source", "`prepare RAW --out RAW --overwrite`, RAW holding a `meta.json`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["raw"]), "--overwrite"],
         "--out holds the source", setup=_with_meta),
    Case("prepare-out-holds-source", "`prepare PROJ/raw --out PROJ --overwrite`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"]), "--overwrite"], "--out holds the source"),
    Case("prepare-overwrite-inside-source", "`prepare RAW --out RAW/prepared --overwrite`, over an earlier output there",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["raw"] / "prepared"), "--overwrite"],
         "--overwrite would replace a folder inside the source", setup=_under_raw),
    Case("prepare-overwrite-user-files", "`prepare --overwrite` of an earlier output a user added `notes.txt` to",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "prepared"), "--overwrite"],
         "it holds files prepare did not write: notes.txt", setup=_prepared_with_notes),
    Case("train-out-model-dir", "`train --out` a retrained model directory",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["model"]), "epochs=1"],
         "--out holds files train did not write"),
    Case("export-out-sweep-json", "`export RESULTS --out RESULTS/sweep.json`",
         lambda w: ["export", str(w["results"]), "--out", str(w["results"] / "sweep.json")],
         "sweep.json: exists and is not an earlier export"),
    Case("predict-out-folder", "`predict --out` an existing folder",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"])], "--out is a folder"),
    # Silently wrong before
    Case("split-nan", "`prepare --split nan/0.5/0.5`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--split", "nan/0.5/0.5"],
         "--split needs three finite fractions"),
    Case("split-no-val", "`prepare --split 1/0/0`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--split", "1/0/0"],
         "--split needs train and validation fractions above 0"),
    Case("model-nan-threshold", "`model.json` with a NaN threshold, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "model.json: thresholds for ['black_core'] are missing or not a number",
         setup=lambda w: _model_json(w, lambda info: info["thresholds"].update(black_core=math.nan))),
    Case("model-no-preprocessing", "`model.json` without `preprocessing`, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "model.json: preprocessing lacks", setup=lambda w: _model_json(w, lambda info: info.pop("preprocessing"))),
    Case("tile-box-outside", "`--fit tile`, a VOC box wholly outside its image (negative coordinates)",
         lambda w: ["prepare", str(w["tmp"] / "voc"), "--format", "voc", "--fit", "tile", "--image-size", "24",
                    "--out", str(w["tmp"] / "o")],
         "crack box (-30, 2, -5, 20) lies outside the 72x24 image", code=0, setup=_voc_tiles, listed="w0.png",
         changed=lambda w: [w["tmp"] / "o"]),
    Case("float-tiff-nan", "a float TIFF with one NaN pixel in a class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "1 non-finite pixel(s) (NaN or infinity)", code=0, setup=_float_tiff_with_nan, listed="nan.tif",
         changed=lambda w: [w["tmp"] / "o"]),
    Case("same-bytes-two-labels", "the same image bytes in two class folders",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "but labelled differently (crack vs scratch); label the image once", code=0, setup=_same_bytes_two_folders,
         listed="c0-copy.png", changed=lambda w: [w["tmp"] / "o"]),
    Case("empty-class-folder", "an empty class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "class folder holds no images", code=0, setup=_class_folder("dent", 0), listed="dent",
         changed=lambda w: [w["tmp"] / "o"]),
    Case("class-case-variants", "class folders `Crack` and `crack`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "classes 'Crack' and 'crack' differ only in case", setup=_class_folder("Crack")),
    Case("class-name-separator", "a class folder named `crack;dent`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "class name 'crack;dent' is empty or holds a separator", setup=_class_folder("crack;dent")),
    Case("classes-absent", "`prepare --classes crack,dent`, no image of `dent`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--classes", "crack,dent"],
         "--classes names ['dent'], which no image carries"),
    Case("manifest-bom", "a manifest CSV saved by Excel (UTF-8 with a byte-order mark)",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "16 images, 1 classes", code=0,
         setup=lambda w: _manifest(w, "\ufeffpath,labels\n" + "".join(f"crack/c{k}.png,crack\nok/o{k}.png,\n" for k in range(8))),
         changed=lambda w: [w["tmp"] / "o"]),
    Case("manifest-latin-1", "a manifest CSV in latin-1 (`défaut` as one byte)",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "labels.csv: not UTF-8 text (byte 0xe9", setup=lambda w: _manifest(w, "path,labels\ncrack/c0.png,défaut\n", "latin-1")),
    Case("manifest-path-leaves", "a manifest row `../../etc/x.png`",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "leaves the manifest's folder", code=0, listed="labels.csv:2",
         setup=lambda w: _manifest(w, "path,labels\n../../etc/x.png,crack\n" + "".join(
             f"crack/c{k}.png,crack\nok/o{k}.png,\n" for k in range(8))),
         changed=lambda w: [w["tmp"] / "o"]),
    Case("model-bad-fit", "`model.json` whose preprocessing names an unknown fit, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "needs positive whole sizes and a fit among",
         setup=lambda w: _model_json(w, lambda info: info["preprocessing"].update(fit="stretch"))),
    Case("meta-classes-mismatch", "`train` on shards whose `meta.json` lists one class too many",
         lambda w: ["train", "--data", str(w["tmp"] / "copy"), "--out", str(w["tmp"] / "t"), "epochs=1"],
         "meta.json does not belong to these shards", setup=_meta_extra_class, changed=lambda w: [w["tmp"] / "t"]),
    Case("meta-shard-outside", "a `meta.json` whose shard is `../../elsewhere.parquet`",
         lambda w: ["train", "--data", str(w["tmp"] / "copy"), "--out", str(w["tmp"] / "t"), "epochs=1"],
         "train shard '../../elsewhere.parquet' is not a file inside the data folder",
         setup=lambda w: _meta_edit(w, lambda meta: meta["splits"]["train"]["shards"][0].update(file="../../elsewhere.parquet")),
         changed=lambda w: [w["tmp"] / "t"]),
    Case("export-no-status", "`export` of a leaderboard without its `status` column",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml")],
         "leaderboard.parquet: no column(s) ['status']", setup=lambda w: _board_edit(w, lambda b: b.drop(columns="status"))),
    Case("export-nan-best-epoch", "`export` where every trial's `best_epoch` is NaN",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml")],
         "--rank 1 asked for, but 0 trial(s) can be exported; passed over: trial t_00001 (best_epoch is nan)",
         setup=lambda w: _board_edit(w, lambda b: b.assign(best_epoch=float("nan")))),
    Case("export-string-objective", "`export` where the objective column holds text",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml"), "--metric", "val_macro_precision"],
         "column 'val_macro_precision' holds no numbers",
         setup=lambda w: _board_edit(w, lambda b: b.assign(val_macro_precision="high"))),
    # Tracebacks before
    Case("long-tail-below-1", "`prepare --long-tail 0.5`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--long-tail", "0.5"], "--long-tail"),
    Case("long-tail-nan", "`prepare --long-tail nan`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--long-tail", "nan"], "--long-tail"),
    Case("seed-negative", "`prepare --seed -1`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--seed", "-1"], "--seed must be"),
    Case("image-size-huge", "`prepare --image-size 50000`",
         lambda w: ["prepare", str(w["raw"]), "--format", "folders", "--out", str(w["tmp"] / "o"), "--image-size", "50000"],
         "--image-size must be between 8 and 8192"),
    Case("prepare-out-under-file", "`prepare --out` a path under a file",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "afile" / "o")], "which is a file", setup=_file),
    Case("train-warmup-inf", "`train warmup_epochs=inf`",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "warmup_epochs=inf"],
         "warmup_epochs: Input should be a finite number", changed=lambda w: [w["tmp"] / "t"]),
    Case("train-mixup-inf", "`train mixup_alpha=inf`",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "mixup_alpha=inf"],
         "mixup_alpha: Input should be a finite number", changed=lambda w: [w["tmp"] / "t"]),
    Case("train-seed-2-32", "`train seed=4294967296`",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "seed=4294967296"],
         "seed: Input should be less than or equal to 4294967295", changed=lambda w: [w["tmp"] / "t"]),
    Case("train-device-gpu", "`train --device gpu`",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "--device", "gpu"],
         "--device 'gpu': choose auto, cpu, cuda or cuda:N", changed=lambda w: [w["tmp"] / "t"]),
    Case("train-pretrained-pickle", "`train pretrained_path=` a pickle that is not a weights file",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "model=el_cnn",
                    f"pretrained_path={w['tmp'] / 'w.pkl'}"],
         "w.pkl: cannot load it as weights for 'el_cnn'",
         setup=lambda w: (w["tmp"] / "w.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4)),
         changed=lambda w: [w["tmp"] / "t"]),
    Case("config-alias-bomb", "`train --config` a YAML alias bomb under `lr` (10⁸ elements once expanded)",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "--config", str(w["tmp"] / "bomb.yaml")],
         "bomb.yaml: lr: Input should be a valid number (got [[[...]", setup=lambda w: (w["tmp"] / "bomb.yaml").write_text(
             "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdef", "bcdefg"))
             + f"lr: [{', '.join(['*g'] * 10)}]\n")),
    Case("train-out-file", "`train --out` a file",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "afile")], "--out is a file", setup=_file),
    Case("train-meta-42", "`train` on a `meta.json` holding `42`",
         lambda w: ["train", "--data", str(w["tmp"] / "badmeta"), "--out", str(w["tmp"] / "t")],
         "meta.json: expected a JSON object, got int", setup=lambda w: _meta_json(w, "42")),
    Case("train-meta-no-height", "`train` on a `meta.json` whose `image` lacks `height`",
         lambda w: ["train", "--data", str(w["tmp"] / "badmeta"), "--out", str(w["tmp"] / "t")],
         "meta.json: 'image' needs a positive integer 'height' and 'width'",
         setup=lambda w: _meta_json(w, '{"classes": ["a"], "image": {"width": 8}, "splits": {}}')),
    Case("predict-batch-0", "`predict --batch-size 0`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv"), "--batch-size", "0"],
         "--batch-size"),
    Case("predict-device-gpu", "`predict --device gpu`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv"), "--device", "gpu"],
         "--device 'gpu'"),
    Case("predict-onnx-missing", "`predict --runtime onnx` on a model directory without `model.onnx`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv"), "--runtime", "onnx"],
         "model.onnx: not found"),
    Case("predict-onnx-not-a-graph", "`predict --runtime onnx` with a `model.onnx` that is not ONNX",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv"), "--runtime", "onnx"],
         "model.onnx: onnxruntime cannot load it", setup=lambda w: (w["model"] / "model.onnx").write_bytes(b"junk")),
    Case("retrain-register-no-mlflow", "`retrain --register NAME` without `--mlflow URI`",
         lambda w: ["retrain", str(w["tmp"] / "best.yaml"), "--data", str(w["data"]), "--out", str(w["tmp"] / "m"),
                    "--register", "line3"], "--register line3: registering needs --mlflow URI"),
    Case("report-out-file", "`report --out` a file",
         lambda w: ["report", str(w["results"]), "--out", str(w["tmp"] / "afile")], "afile", setup=_file),
    # Inputs of our own: what a factory's folders hold
    Case("prepare-overwrite-split-user-file", "`prepare --overwrite` of an earlier output with a user's file in `train/`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "prepared"), "--overwrite"],
         "it holds files prepare did not write: train/important.txt", setup=_prepared_with_split_file),
    Case("prepare-symlinked-class", "a class folder that is a symlink to a share elsewhere",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "30 images, 4 classes", code=0, setup=_linked_class, changed=lambda w: [w["tmp"] / "o"],
         then=lambda w, output: _positives(w, "dent", 6)),
    Case("predict-symlinked-folder", "`predict` on a folder holding a symlinked subfolder",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "30 images,", code=0, setup=_linked_class, changed=lambda w: [w["tmp"] / "p.csv"],
         then=_predicted_all([f"d{k}.png" for k in range(6)])),
    Case("predict-webp-gif", "`predict` on a folder with a `.webp` and a `.gif`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "26 images,", code=0, setup=_webp_and_gif, changed=lambda w: [w["tmp"] / "p.csv"],
         then=_predicted_all(["a.webp", "b.gif"])),
    Case("predict-nan-pixel", "`predict` on a float TIFF with one NaN pixel",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "nan.tif: cannot decode image: 1 non-finite pixel(s)", code=0, setup=_float_tiff_with_nan,
         changed=lambda w: [w["tmp"] / "p.csv"], then=lambda w, output: _errors(w, ["nan.tif"])),
    Case("model-missing-threshold", "`model.json` without one class's threshold, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "model.json: thresholds for ['black_core'] are missing",
         setup=lambda w: _model_json(w, lambda info: info["thresholds"].pop("black_core"))),
    Case("train-meta-null", "`train` on a `meta.json` holding `null`",
         lambda w: ["train", "--data", str(w["tmp"] / "badmeta"), "--out", str(w["tmp"] / "t")],
         "meta.json: expected a JSON object, got NoneType", setup=_meta_value("null")),
    Case("train-meta-string", "`train` on a `meta.json` holding a string",
         lambda w: ["train", "--data", str(w["tmp"] / "badmeta"), "--out", str(w["tmp"] / "t")],
         "meta.json: expected a JSON object, got str", setup=_meta_value('"classes: a, b"')),
    Case("export-inf-objective", "`export` where the leading trial's objective is infinite",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml")],
         "passed over trial t_00001: val_guarded_macro_recall is inf", code=0,
         setup=lambda w: _board_edit(w, lambda b: b.assign(val_guarded_macro_recall=b["val_guarded_macro_recall"].where(
             b["trial_id"] != "t_00001", float("inf")))),
         changed=lambda w: [w["tmp"] / "best.yaml"]),
    Case("manifest-newline-label", "a manifest label holding a line break (`\"crack\\ndent\"`)",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "class name 'crack\\ndent' is empty or holds a separator",
         setup=_manifest_with_label('"crack\ndent"')),
    Case("manifest-conflicting-labels", "a manifest naming one image twice (`./crack/c0.png`, `crack/c0.png`) with different labels",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "is labelled ['scratch'] here but ['crack'] at line 2", code=0, listed="labels.csv:4",
         setup=lambda w: _manifest(w, "path,labels\n./crack/c0.png,crack\nok/o0.png,\ncrack/c0.png,scratch\n" + "".join(
             f"crack/c{k}.png,crack\nok/o{k}.png,\n" for k in range(1, 8))),
         changed=lambda w: [w["tmp"] / "o"]),
    Case("train-weight-override-unknown", "`train class_weight_overrides={crak: 2}` (a misspelt class)",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "epochs=1", "class_weight_overrides={crak: 2}"],
         "class_weight_overrides: class-weight overrides name unknown classes ['crak']", changed=lambda w: [w["tmp"] / "t"]),
    Case("train-val-no-defects", "`train` on data whose validation split holds no defect",
         lambda w: ["train", "--data", str(w["tmp"] / "copy"), "--out", str(w["tmp"] / "t"), "epochs=1"],
         "meta.json: the val split holds no image with a defect",
         setup=lambda w: _meta_edit(w, lambda meta: meta["splits"]["val"]["positives"].update(
             dict.fromkeys(meta["splits"]["val"]["positives"], 0))),
         changed=lambda w: [w["tmp"] / "t"]),
    Case("deep-png-own-depths", "16-bit PNGs from a 12-bit sensor, some frames dim, no `--bit-depth`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "scaled by each image's own bit depth: 11-bit (3), 12-bit (3); the dimmer ones were brightened", code=0,
         setup=_deep_frames, changed=lambda w: [w["tmp"] / "o"], then=_deep_scaled({"11": 3, "12": 3}, None)),
    Case("deep-png-bit-depth", "the same with `--bit-depth 12`, and one frame brighter than 12 bits",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--bit-depth", "12"],
         "brightest pixel 5000 is above the 12-bit range", code=0, setup=_deep_frame_above, listed="hot.png",
         changed=lambda w: [w["tmp"] / "o"], then=_deep_scaled({"12": 6}, 12)),
    Case("bit-depth-8", "`prepare --bit-depth 8`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--bit-depth", "8"],
         "--bit-depth must be between 9 and 32"),
    # Second round (issue 30)
    Case("predict-nan-weights", "`predict` with a model whose weights are NaN",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "the model gave a non-finite probability (NaN or infinity) for 24 of 24 image(s)", setup=_nan_weights,
         changed=lambda w: [w["tmp"] / "p.csv"], then=_no_decisions),
    Case("severstal-rle-overflow", "a Severstal RLE holding `18446744073709551616` (2⁶⁴)",
         lambda w: ["prepare", str(w["tmp"] / "sev"), "--format", "severstal", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "train.csv:2: EncodedPixels value 18446744073709551616 is larger than any image's pixel count", code=0,
         listed="im0.png", setup=lambda w: _severstal(w, "im0.png,1,1 18446744073709551616"), changed=lambda w: [w["tmp"] / "o"]),
    Case("severstal-rle-overflow-strict", "the same with `--strict`",
         lambda w: ["prepare", str(w["tmp"] / "sev"), "--format", "severstal", "--image-size", "16", "--out", str(w["tmp"] / "o"),
                    "--strict"],
         "train.csv:2: EncodedPixels value 18446744073709551616 is larger",
         setup=lambda w: _severstal(w, "im0.png,1,1 18446744073709551616")),
    Case("meta-shape-scrambled", "`train` on 32x32 shards whose `meta.json` says 16x64 (the same pixel count)",
         lambda w: ["train", "--data", str(w["tmp"] / "copy"), "--out", str(w["tmp"] / "t"), "epochs=1"],
         "train/part-00000.parquet: holds images of 32x32",
         setup=lambda w: _meta_edit(w, lambda meta: meta["image"].update(height=16, width=64)), changed=lambda w: [w["tmp"] / "t"]),
    Case("shard-label-2", "`train` on a shard holding the label value 2",
         lambda w: ["train", "--data", str(w["tmp"] / "copy"), "--out", str(w["tmp"] / "t"), "epochs=1"],
         "train/part-00000.parquet: holds label value(s) [2]", setup=_shard_with_label(2), changed=lambda w: [w["tmp"] / "t"]),
    Case("model-duplicate-classes", "`model.json` naming one class twice, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "model.json: classes lists ['black_core'] more than once",
         setup=lambda w: _model_json(w, lambda info: info["classes"].__setitem__(1, "black_core"))),
    Case("model-reordered-classes", "`model.json` with its classes reordered, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "differ from the order of those model.safetensors was trained with",
         setup=lambda w: _model_json(w, lambda info: info["classes"].reverse())),
    Case("model-class-count", "`model.json` one class short, weights without their class record, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "model.json: lists 5 classes, but the weights' head", setup=lambda w: (_weights_without_record(w), _model_json(w, _one_class_less))),
    Case("model-huge-size", "`model.json` whose preprocessing says 20000x20000, then `predict`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "is larger than prepare writes (image_size at most 8192",
         setup=lambda w: _model_json(w, lambda info: info["preprocessing"].update(image_size=20000, height=20000, width=20000))),
    Case("prepare-workers-negative", "`prepare --workers -3`",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o"), "--workers", "-3"],
         "--workers must be at least 1"),
    Case("export-sweep-mode", "`export` of a sweep whose `sweep.json` says `mode: sideways`",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml")],
         "sweep.json: mode 'sideways' is neither max nor min", setup=lambda w: _sweep_json(w, lambda sweep: sweep.update(mode="sideways"))),
    Case("config-duplicate-key", "`train --config` a YAML file naming `lr` twice",
         lambda w: ["train", "--data", str(w["data"]), "--out", str(w["tmp"] / "t"), "--config", str(w["tmp"] / "dup.yaml")],
         "dup.yaml: duplicate key 'lr' at line 3 (first at line 1)",
         setup=lambda w: (w["tmp"] / "dup.yaml").write_text("lr: 0.1\nepochs: 1\nlr: 0.01\n"), changed=lambda w: [w["tmp"] / "t"]),
    Case("space-duplicate-key", "`search --space` a YAML file naming `lr` twice under `params`",
         lambda w: ["search", "--data", str(w["data"]), "--space", str(w["tmp"] / "space.yaml"), "--out", str(w["tmp"] / "s")],
         "space.yaml: duplicate key 'lr' at line 5 (first at line 4)",
         setup=lambda w: (w["tmp"] / "space.yaml").write_text(
             "num_samples: 2\nmax_epochs: 1\nparams:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n  lr: {loguniform: [1.0e-3, 1.0e-1]}\n"),
         changed=lambda w: [w["tmp"] / "s"]),
    Case("prepare-class-linked-into-another", "a class folder linked into another class's folder (`crack/sc -> ../scratch`)",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "is one file labelled crack vs scratch by ", code=0, listed="s0.png",
         setup=_class_linked_into_another, changed=lambda w: [w["tmp"] / "o"]),
    Case("prepare-dangling-link", "a dangling symlink in a class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "dangling link (to ", code=0, listed="gone.png",
         setup=lambda w: (w["raw"] / "crack" / "gone.png").symlink_to(w["tmp"] / "nowhere.png"), changed=lambda w: [w["tmp"] / "o"]),
    Case("prepare-fifo-in-class", "a FIFO named `pipe.png` in a class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "not a regular file: a FIFO (named pipe)", code=0, listed="pipe.png",
         setup=_fifo(Path("crack/pipe.png")), changed=lambda w: [w["tmp"] / "o"]),
    Case("predict-fifo-in-folder", "`predict` on a folder holding a FIFO named `pipe.png`",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", str(w["tmp"] / "p.csv")],
         "pipe.png: not a regular file: a FIFO (named pipe)", code=0, setup=_fifo(Path("crack/pipe.png")),
         changed=lambda w: [w["tmp"] / "p.csv"], then=lambda w, output: _errors(w, ["pipe.png"])),
    Case("predict-fifo-named", "`predict` naming an image and a FIFO",
         lambda w: ["predict", str(w["model"]), str(w["raw"] / "crack" / "c0.png"), str(w["tmp"] / "pipe.png"),
                    "--out", str(w["tmp"] / "p.csv")],
         "pipe.png: not a regular file: a FIFO (named pipe)", code=0, setup=lambda w: os.mkfifo(w["tmp"] / "pipe.png"),
         changed=lambda w: [w["tmp"] / "p.csv"], then=lambda w, output: _errors(w, ["pipe.png"])),
    Case("prepare-same-stem", "`c0.png` and `c0.jpg` in one class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "25 images, 3 classes", code=0, setup=_same_stem, changed=lambda w: [w["tmp"] / "o"],
         then=lambda w, output: _positives(w, "crack", 9)),
    Case("prepare-out-symlink", "`prepare --out` a symlink to a folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "--out is a symbolic link (to ", setup=_out_link),
    Case("prepare-out-read-only", "`prepare --out` in a folder nobody may write (sysfs)",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", "/sys/kernel/defect-tune-out"],
         "/sys/kernel/defect-tune-out: cannot write beside it in /sys/kernel"),
    Case("predict-out-read-only", "`predict --out` in a folder nobody may write (sysfs)",
         lambda w: ["predict", str(w["model"]), str(w["raw"]), "--out", "/sys/kernel/p.csv"],
         "/sys/kernel: cannot write there"),
    Case("train-out-read-only", "`train --out` in a folder nobody may write (sysfs)",
         lambda w: ["train", "--data", str(w["data"]), "--out", "/sys/kernel/t", "epochs=1"],
         "/sys/kernel/t: cannot write there"),
    Case("search-out-read-only", "`search --out` in a folder nobody may write (sysfs)",
         lambda w: ["search", "--data", str(w["data"]), "--space", "quick", "--out", "/sys/kernel/s"],
         "/sys/kernel/s: cannot write there"),
    Case("prepare-no-usable-images", "class folders holding only `.txt` notes",
         lambda w: ["prepare", str(w["tmp"] / "texts"), *PREPARE, "--out", str(w["tmp"] / "o")],
         "no usable images found (8 skipped: 6 not an image file (suffix .txt), e.g. shift0.txt, shift1.txt; 2 class folder holds no images", setup=_text_only_folders),
    Case("export-rank-0", "`export --rank 0`",
         lambda w: ["export", str(w["results"]), "--out", str(w["tmp"] / "best.yaml"), "--rank", "0"],
         "--rank 0: ranks start at 1"),
    Case("manifest-slash-label", "a manifest label `prob/craz/ing`",
         lambda w: ["prepare", str(w["raw"] / "labels.csv"), "--format", "csv", "--image-size", "16", "--out", str(w["tmp"] / "o")],
         "labels.csv:2: class name 'prob/craz/ing' is empty or holds a separator",
         setup=_manifest_with_label("prob/craz/ing")),
    Case("report-out-user-folder", "`report --out` a folder of the user's holding `holiday.png`",
         lambda w: ["report", str(w["results"]), "--out", str(w["tmp"] / "mine")],
         "--out holds files report did not write (holiday.png)",
         setup=lambda w: write_image(w["tmp"] / "mine" / "holiday.png", 900)),
    Case("report-out-user-report-html", "`report --out` a folder holding the user's own `report.html`",
         lambda w: ["report", str(w["results"]), "--out", str(w["tmp"] / "mine")],
         "report.html: exists and is not an earlier defect-tune report",
         setup=lambda w: (w["tmp"] / "mine").mkdir() or (w["tmp"] / "mine" / "report.html").write_text("<html>shift notes</html>")),
    Case("messy-factory-folder", "a plant's shared folder: `Thumbs.db`, `.DS_Store`, a note, an empty and a cut-off file, "
         "`UPPER.PNG`, a subfolder, a WebP, a 12-bit PNG, one image in two class folders, a linked and an empty class folder",
         lambda w: ["prepare", str(w["raw"]), *PREPARE, "--out", str(w["tmp"] / "o")],
         "31 images, 4 classes", code=0, setup=_messy_factory_folder, changed=lambda w: [w["tmp"] / "o"], then=_messy_prepared),
]


def table_markdown() -> str:
    rows = ["| Bad input | Exit | What the user gets | Row id |", "|---|---:|---|---|"]
    def gets(case: Case) -> str:
        if case.listed:
            return f"skipped, listed in `bad_inputs.csv`: `{case.says}`"
        return f"read as meant: `{case.says}`" if case.code == 0 else f"one line: `{case.says}`"

    rows += [f"| {case.bad_input} | {case.code} | {gets(case)} | `{case.id}` |" for case in CASES]
    return "\n".join([BEGIN, *rows, END])


def checksums(root: Path, skip: list[Path]) -> dict[str, str]:
    """Every file under `root`, through symlinked folders too (the prepared data is one), except
    under `skip`."""
    skip = [path.resolve() for path in skip]
    files = sorted(Path(folder) / name for folder, _, names in os.walk(root, followlinks=True) for name in names)
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files if path.is_file()
            and not any(path.resolve() == s or s in path.resolve().parents for s in skip)}


@pytest.fixture
def workspace(tmp_path, synthetic_data):
    """A factory folder of class folders (`raw`), a prepared folder, a model directory and a
    sweep's results, all under tmp_path."""
    from test_production import make_results, write_model_dir

    raw = tmp_path / "raw"
    for k in range(8):
        write_image(raw / "crack" / f"c{k}.png", k)
        write_image(raw / "scratch" / f"s{k}.png", 100 + k)
        write_image(raw / "ok" / f"o{k}.png", 200 + k)
    data = tmp_path / "data"
    data.symlink_to(synthetic_data)
    classes = json.loads((synthetic_data / "meta.json").read_text())["classes"]
    assert classes[0] == "black_core"  # the class the NaN-threshold row names
    model = write_model_dir(tmp_path, synthetic_data, [0.5] * len(classes))
    (tmp_path / "sweep").mkdir()
    results = make_results(tmp_path / "sweep", synthetic_data)
    return {"tmp": tmp_path, "raw": raw, "data": data, "model": model, "results": results}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_input_is_one_line_naming_it_and_changes_nothing_else(case, workspace):
    case.setup(workspace)
    before = checksums(workspace["tmp"], case.changed(workspace))
    done = subprocess.run([sys.executable, "-m", "defect_tune", *case.command(workspace)],
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output[-3000:]
    assert "Traceback" not in output and len(output) < 10_000, output[-3000:]
    if case.listed:  # skipped, with its reason, and the rest prepared
        with open(workspace["tmp"] / "o" / "bad_inputs.csv", newline="") as handle:
            listed = [row for row in csv.DictReader(handle) if Path(row["file"]).name == case.listed]
        assert len(listed) >= 1 and all(case.says in row["reason"] for row in listed), listed
        assert json.loads((workspace["tmp"] / "o" / "meta.json").read_text())["bad_inputs"] >= len(listed)
    elif case.code == 0:  # read as intended: the summary says so
        assert case.says in " ".join(output.split()), output[-3000:]
    else:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and case.says in " ".join(done.stderr.split()), done.stderr[-3000:]
    assert checksums(workspace["tmp"], case.changed(workspace)) == before
    case.then(workspace, output)


def test_bad_inputs_page_carries_this_table():
    assert table_markdown() in PAGE.read_text(), "tests/BAD_INPUTS.md is out of date: run python tests/test_bad_inputs.py"


def test_every_test_the_page_cites_exists():
    """The hand-written rows name the test that asserts them; a renamed or deleted test must not
    leave a row that nothing checks."""
    import ast
    import re

    cited = set(re.findall(r"\b(test_\w+\.py)::(test_\w+)", PAGE.read_text()))
    assert len(cited) > 50
    defined = {}
    for file in {file for file, _ in cited}:
        tree = ast.parse((Path(__file__).parent / file).read_text())
        defined[file] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert sorted(f"{file}::{name}" for file, name in cited if name not in defined[file]) == []


if __name__ == "__main__":
    text = PAGE.read_text()
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + table_markdown() + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Command line (tests/test_bad_inputs.py)\n\n" + table_markdown() + "\n"
    PAGE.write_text(text)
    print(f"wrote {len(CASES)} rows to {PAGE}")
