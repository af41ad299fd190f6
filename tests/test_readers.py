import os
from pathlib import Path

import pytest
from conftest import make_voc, voc_xml, write_image

from defect_tune.data.readers import one_item_per_file, read_elpv, read_folders, read_manifest, read_severstal, read_voc

# ---------------------------------------------------------------- VOC


def test_voc_labels_are_image_level_multi_hot_and_no_object_means_defect_free(tmp_path):
    root = make_voc(tmp_path, {"a": ["crack", "crack", "scratch"], "b": ["scratch"], "c": []})
    catalog = read_voc(root)
    by_id = {item.id: item for item in catalog.items}
    assert by_id["a"].labels == ("crack", "scratch")  # two crack boxes, one label
    assert len(by_id["a"].regions) == 3
    assert by_id["b"].labels == ("scratch",)
    assert by_id["c"].labels == ()
    assert catalog.bad == []


def test_voc_filename_resolves_with_and_without_extension(tmp_path):
    root = make_voc(tmp_path, {"with": ["crack"]})
    make_voc(tmp_path, {"without": ["crack"]}, with_extension=False)
    catalog = read_voc(root)
    assert sorted(item.path.name for item in catalog.items) == ["with.jpg", "without.jpg"]
    assert catalog.bad == []


def test_voc_bad_inputs_are_listed_with_file_and_reason(tmp_path):
    root = make_voc(tmp_path, {"good": ["crack"], "orphan": ["crack"]})
    (root / "Annotations" / "orphan.xml").unlink()
    annotations = root / "Annotations"
    (annotations / "broken.xml").write_text("<annotation><filename>good.jpg</filename>")
    (annotations / "escape.xml").write_text(voc_xml("../../etc/passwd", [("crack", (1, 1, 5, 5))]))
    (annotations / "absolute.xml").write_text(voc_xml("/etc/passwd", [("crack", (1, 1, 5, 5))]))
    (annotations / "missing.xml").write_text(voc_xml("nowhere.jpg", [("crack", (1, 1, 5, 5))]))
    (annotations / "noname.xml").write_text(
        "<annotation><filename>x.jpg</filename><object><name> </name></object></annotation>"
    )
    write_image(root / "JPEGImages" / "x.jpg", 7)
    (annotations / "twice.xml").write_text(voc_xml("good.jpg", [("crack", (1, 1, 5, 5))]))
    catalog = read_voc(root)
    found = {Path(b.file).name: b.reason for b in catalog.bad}
    assert "malformed XML" in found["broken.xml"]
    assert "outside" in found["escape.xml"]
    assert "outside" in found["absolute.xml"]
    assert "not found" in found["missing.xml"]
    assert "without a <name>" in found["noname.xml"]
    assert "no annotation XML" in found["orphan.jpg"]
    assert "already annotated" in found["twice.xml"]
    assert [item.id for item in catalog.items] == ["good"]


def test_voc_bad_boxes_are_listed_once_under_their_xml(tmp_path):
    root = make_voc(tmp_path, {"good": ["crack"], "inverted": [], "no_xmax": [], "word": [], "infinite": []})
    annotations = root / "Annotations"
    (annotations / "inverted.xml").write_text(voc_xml("inverted.jpg", [("crack", (20, 2, 5, 22))]))
    (annotations / "no_xmax.xml").write_text(
        "<annotation><filename>no_xmax.jpg</filename><object><name>crack</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><ymax>5</ymax></bndbox></object></annotation>"
    )
    (annotations / "word.xml").write_text(voc_xml("word.jpg", [("crack", (1, 1, "abc", 5))]))
    (annotations / "infinite.xml").write_text(voc_xml("infinite.jpg", [("crack", (1, 1, "inf", 5))]))
    catalog = read_voc(root)
    found = {Path(b.file).name: b.reason for b in catalog.bad}
    assert found == {
        "inverted.xml": "bad <object>: <bndbox> is inverted: [20, 2, 5, 22]",
        "no_xmax.xml": "bad <object>: <bndbox> has no <xmax>",
        "word.xml": "bad <object>: <bndbox> <xmax> 'abc' is not a finite number",
        "infinite.xml": "bad <object>: <bndbox> <xmax> 'inf' is not a finite number",
    }  # their images are not listed again as having no annotation XML
    assert [item.id for item in catalog.items] == ["good"]


def test_voc_missing_folders_is_an_error_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        read_voc(tmp_path)


# ---------------------------------------------------------------- Severstal


def severstal(tmp_path: Path, rows: str, images: list[str]) -> Path:
    for seed, name in enumerate(images):
        write_image(tmp_path / "train_images" / name, seed, size=(16, 100))
    (tmp_path / "train.csv").write_text(rows)
    return tmp_path


def test_severstal_rows_become_multi_hot_and_unlisted_images_are_defect_free(tmp_path):
    root = severstal(
        tmp_path,
        "ImageId,ClassId,EncodedPixels\na.jpg,1,1 5\na.jpg,3,20 4\nb.jpg,4,1 16 100 3\n",
        ["a.jpg", "b.jpg", "c.jpg"],
    )
    catalog = read_severstal(root)
    by_id = {item.id: item for item in catalog.items}
    assert by_id["a"].labels == ("class_1", "class_3")
    assert by_id["b"].labels == ("class_4",)
    assert by_id["c"].labels == ()
    assert [r.rle for r in by_id["b"].regions] == ["1 16 100 3"]


def test_severstal_bad_rows_skip_their_image_and_name_the_line(tmp_path):
    root = severstal(
        tmp_path,
        "ImageId,ClassId,EncodedPixels\na.jpg,1,1 5\nb.jpg,x,1 5\nc.jpg,2,1 5 7\nd.jpg,2,1 5\n,1,1 2\n",
        ["a.jpg", "b.jpg", "c.jpg"],
    )
    catalog = read_severstal(root)
    found = {Path(b.file).name: b.reason for b in catalog.bad}
    assert "train.csv:3" in found["b.jpg"] and "ClassId" in found["b.jpg"]
    assert "train.csv:4" in found["c.jpg"] and "odd number" in found["c.jpg"]
    assert "not found" in found["d.jpg"]
    assert "no ImageId" in found["train.csv:6"]
    assert [item.id for item in catalog.items] == ["a"]


def test_severstal_old_layout_is_read(tmp_path):
    root = severstal(
        tmp_path, "ImageId_ClassId,EncodedPixels\na.jpg_1,1 3\na.jpg_2,\nb.jpg_1,\n", ["a.jpg", "b.jpg"]
    )
    catalog = read_severstal(root)
    assert {item.id: item.labels for item in catalog.items} == {"a": ("class_1",), "b": ()}


def test_severstal_header_must_have_its_columns(tmp_path):
    root = severstal(tmp_path, "Image,Class\n", ["a.jpg"])
    with pytest.raises(ValueError, match="train.csv: header"):
        read_severstal(root)


# ---------------------------------------------------------------- class folders


def test_folders_top_level_classes_defect_free_and_excludes(tmp_path):
    write_image(tmp_path / "def_front" / "d1.jpeg", 1)
    write_image(tmp_path / "ok_front" / "o1.jpeg", 2)
    write_image(tmp_path / "MT_Crack" / "Imgs" / "c1.jpg", 3)
    write_image(tmp_path / "MT_Crack" / "Imgs" / "c1.png", 4)  # a magnetic-tile mask
    (tmp_path / "MT_Crack" / "notes.txt").write_text("hi")
    (tmp_path / "loose.jpg").write_bytes(b"")
    (tmp_path / "ok_front" / ".DS_Store").write_bytes(b"")
    catalog = read_folders(tmp_path, defect_free=("ok_front",), exclude=("*.png",))
    assert {item.id: item.labels for item in catalog.items} == {
        "MT_Crack/Imgs/c1": ("MT_Crack",),
        "def_front/d1": ("def_front",),
        "ok_front/o1": (),
    }
    found = {Path(b.file).name: b.reason for b in catalog.bad}
    assert set(found) == {"notes.txt", "loose.jpg"}
    assert "not an image" in found["notes.txt"]
    assert "not inside a class folder" in found["loose.jpg"]


def test_folders_unknown_defect_free_folder_is_an_error(tmp_path):
    write_image(tmp_path / "def" / "a.png", 1)
    with pytest.raises(ValueError, match="defect-free folder"):
        read_folders(tmp_path, defect_free=("ok",))


# ---------------------------------------------------------------- CSV manifest


def test_manifest_labels_metadata_and_bad_rows(tmp_path):
    write_image(tmp_path / "img" / "a.png", 1)
    write_image(tmp_path / "img" / "b.png", 2)
    absolute = write_image(tmp_path / "elsewhere" / "c.png", 3)
    (tmp_path / "m.csv").write_text(
        "path,labels,line\n"
        "img/a.png,crack; scratch,L1\n"
        "img/b.png,,L2\n"
        f"{absolute},crack,L1\n"
        "./img/a.png,scratch;crack,L1\n"
        ",crack,L1\n"
        "img/x.png,crack\n"
    )
    catalog = read_manifest(tmp_path / "m.csv")
    assert [(i.id, i.labels, dict(i.meta)["line"]) for i in catalog.items] == [
        ("img/a", ("crack", "scratch"), "L1"),
        ("img/b", (), "L2"),
        (str(absolute.with_suffix("")), ("crack",), "L1"),
    ]
    assert catalog.meta_columns == ("line",)
    found = {b.file.rsplit(":", 1)[1]: b.reason for b in catalog.bad}
    assert "duplicate row" in found["5"] and "line 2" in found["5"]
    assert "empty path" in found["6"]
    assert "2 fields" in found["7"]


def test_manifest_rows_that_label_one_image_differently_drop_it(tmp_path):
    """`./img/a.png` and `img/a.png` are one file: labelled two ways, neither row can be trusted,
    so the image is left out and both rows are listed, each naming the other."""
    write_image(tmp_path / "img" / "a.png", 1)
    write_image(tmp_path / "img" / "b.png", 2)
    (tmp_path / "m.csv").write_text("path,labels\n./img/a.png,crack\nimg/b.png,\nimg/a.png,scratch\n")
    catalog = read_manifest(tmp_path / "m.csv")
    assert [i.id for i in catalog.items] == ["img/b"]
    found = {b.file.rsplit(":", 1)[1]: b.reason for b in catalog.bad}
    assert "labelled ['scratch'] here but ['crack'] at line 2" in found["4"]
    assert "a.png: labelled differently at line 4" in found["2"]


def test_manifest_needs_path_and_labels_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="m.csv: header"):
        read_manifest(tmp_path / "m.csv")


# ---------------------------------------------------------------- elpv


def test_elpv_threshold_and_metadata(tmp_path):
    for k in range(4):
        write_image(tmp_path / "images" / f"cell{k}.png", k)
    (tmp_path / "labels.csv").write_text(
        "images/cell0.png  1.0  mono\n"
        "images/cell1.png  0.3333333333333333  poly\n"
        "images/cell2.png  0.6666666666666666  poly\n"
        "images/cell3.png  0.0  mono\n"
        "images/cell4.png  nope  mono\n"
        "../cell5.png  1.0  mono\n"
        "images/cell6.png  1.0\n"
        "images/cell7.png  1.5  mono\n"
        "images/cell8.png  nan  mono\n"
    )
    catalog = read_elpv(tmp_path, threshold=0.5)
    assert [(i.id, i.labels, dict(i.meta)["cell_type"]) for i in catalog.items] == [
        ("images/cell0", ("defective",), "mono"),
        ("images/cell1", (), "poly"),
        ("images/cell2", ("defective",), "poly"),
        ("images/cell3", (), "mono"),
    ]
    found = {b.file.rsplit(":", 1)[1]: b.reason for b in catalog.bad}
    assert found == {
        "5": "probability 'nope' is not a number",
        "6": f"path '../cell5.png' points outside {tmp_path}",
        "7": "expected 'path probability type', got 2 fields",
        "8": "probability 1.5 is outside [0, 1]",
        "9": "probability nan is outside [0, 1]",
    }
    assert all(b.file.startswith(f"{tmp_path / 'labels.csv'}:") for b in catalog.bad)
    assert read_elpv(tmp_path, threshold=1 / 3).items[1].labels == ("defective",)


def test_folders_follow_symlinked_class_folders_once(tmp_path):
    """Class folders linked in from elsewhere (a shared drive) are read like real ones; a link
    back up the tree does not loop."""
    elsewhere = tmp_path / "share" / "scratch"
    for k in range(3):
        write_image(elsewhere / f"s{k}.png", k)
    root = tmp_path / "root"
    write_image(root / "crack" / "c0.png", 10)
    (root / "scratch").symlink_to(elsewhere, target_is_directory=True)
    (root / "crack" / "loop").symlink_to(root / "crack", target_is_directory=True)
    catalog = read_folders(root)
    assert sorted(item.id for item in catalog.items) == ["crack/c0", "scratch/s0", "scratch/s1", "scratch/s2"]
    assert {item.labels for item in catalog.items} == {("crack",), ("scratch",)}
    assert [(bad.file, bad.reason.split(" (")[0]) for bad in catalog.bad] == [
        (str(root / "crack" / "loop"), "link back up the tree")]


def test_one_link_rule_a_file_reachable_under_two_labels_is_refused_and_listed_never_relabelled(tmp_path):
    """A class folder linked into another (`crazing/inc -> ../inclusion`) used to lend its images to
    whichever folder came first alphabetically. Now each such file is refused, listed under both
    paths; a link within one class reads the file once; dangling links and FIFOs are listed."""
    root = tmp_path / "F"
    for k in range(2):
        write_image(root / "crazing" / f"c{k}.png", k)
        write_image(root / "inclusion" / f"i{k}.png", 10 + k)
    (root / "crazing" / "inc").symlink_to("../inclusion", target_is_directory=True)
    (root / "crazing" / "again.png").symlink_to("c1.png")  # within one class: read once
    (root / "crazing" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "crazing" / "pipe.png")
    catalog = one_item_per_file(read_folders(root))
    assert sorted((item.id, item.labels) for item in catalog.items) == [
        ("crazing/c0", ("crazing",)), ("crazing/c1", ("crazing",))]
    reasons = {bad.file: bad.reason for bad in catalog.bad}
    for k in range(2):
        for path in (root / "inclusion" / f"i{k}.png", root / "crazing" / "inc" / f"i{k}.png"):
            assert reasons[str(path)].startswith(f"{path} is one file labelled crazing vs inclusion by ")
            assert reasons[str(path)].endswith("; label it once (one class folder, one row)")
    again = root / "crazing" / "again.png"
    assert reasons[str(again)] == (f"{again} is the same file as {root / 'crazing' / 'c1.png'} "
                                   "(through a link or another path to it): read once")
    assert reasons[str(root / "crazing" / "gone.png")].startswith("dangling link (to ")
    assert reasons[str(root / "crazing" / "pipe.png")] == "not a regular file: a FIFO (named pipe)"


def test_an_id_is_unique_per_image_file_and_two_rows_for_one_file_with_two_labels_are_refused(tmp_path):
    root = tmp_path / "F"
    write_image(root / "crazing" / "a.png", 1)
    write_image(root / "crazing" / "a.jpg", 2)
    write_image(root / "crazing" / "b.png", 3)
    catalog = one_item_per_file(read_folders(root))
    assert sorted(item.id for item in catalog.items) == ["crazing/a.jpg", "crazing/a.png", "crazing/b"]
    manifest = tmp_path / "m.csv"
    (tmp_path / "link.png").symlink_to(root / "crazing" / "b.png")
    manifest.write_text("path,labels\nF/crazing/b.png,crazing\nlink.png,scratch\nF/crazing/a.png,crazing\n")
    catalog = one_item_per_file(read_manifest(manifest))
    assert [item.id for item in catalog.items] == ["F/crazing/a"]
    assert len(catalog.bad) == 2 and all("is one file labelled crazing vs scratch" in bad.reason
                                         for bad in catalog.bad)
