import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from defect_tune.data.synthetic import CLASSES, SyntheticSpec, generate_voc


def read_labels(root: Path) -> tuple[list[str], np.ndarray, list[list[tuple]]]:
    """Stems in order, a multi-hot label matrix, and the boxes of every image."""
    stems, labels, boxes = [], [], []
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        annotation = ET.parse(xml_path).getroot()
        stems.append(xml_path.stem)
        row = np.zeros(len(CLASSES), dtype=np.float32)
        image_boxes = []
        for obj in annotation.iter("object"):
            name = obj.findtext("name")
            row[CLASSES.index(name)] = 1
            box = obj.find("bndbox")
            image_boxes.append((name, *(int(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))))
        labels.append(row)
        boxes.append(image_boxes)
    return stems, np.stack(labels), boxes


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_spec_gives_identical_bytes_and_other_seed_differs(tmp_path):
    spec = SyntheticSpec(num_images=40, image_size=48, seed=3)
    generate_voc(tmp_path / "a", spec)
    generate_voc(tmp_path / "b", spec)
    generate_voc(tmp_path / "c", SyntheticSpec(num_images=40, image_size=48, seed=4))
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 40 + 1
    assert a == b
    images = [k for k in a if k.startswith("JPEGImages")]
    assert all(a[k] != c[k] for k in images)


def test_counts_match_annotations_and_follow_the_imbalance(tmp_path):
    spec = SyntheticSpec(num_images=1500, image_size=32, imbalance=30.0, seed=0)
    counts = generate_voc(tmp_path, spec)
    stems, labels, boxes = read_labels(tmp_path)

    assert stems == [f"syn_{i:05d}" for i in range(1500)]
    assert counts == {name: int(n) for name, n in zip(CLASSES, labels.sum(0))}
    assert json.loads((tmp_path / "synthetic.json").read_text())["counts"] == counts

    per_class = labels.sum(0)
    assert per_class.argmax() == 0 and per_class.argmin() == len(CLASSES) - 1
    ratio = per_class[0] / per_class[-1]
    assert spec.imbalance / 2 <= ratio <= spec.imbalance * 2, ratio

    defects_per_image = labels.sum(1)
    assert 0.10 <= (defects_per_image == 0).mean() <= 0.20  # defect_free_fraction 0.15
    assert 0.05 <= (defects_per_image == 2).mean() <= 0.20  # 0.85 * 0.15 expected
    assert defects_per_image.max() == 2  # the second class is always a different one

    for image_boxes in boxes:
        for _, xmin, ymin, xmax, ymax in image_boxes:
            assert 1 <= xmin <= xmax <= 32 and 1 <= ymin <= ymax <= 32


def test_images_are_grayscale_png_and_boxes_cover_the_defect(tmp_path):
    spec = SyntheticSpec(num_images=300, image_size=64, imbalance=1.0, second_defect_prob=0.0, seed=5)
    generate_voc(tmp_path, spec)
    stems, labels, boxes = read_labels(tmp_path)
    annotation = ET.parse(tmp_path / "Annotations" / f"{stems[0]}.xml").getroot()
    assert annotation.findtext("filename") == f"{stems[0]}.png"
    assert annotation.findtext("size/depth") == "1"

    checked = 0
    for stem, image_boxes in zip(stems, boxes):
        image = Image.open(tmp_path / "JPEGImages" / f"{stem}.png")
        assert image.format == "PNG" and image.mode == "L" and image.size == (64, 64)
        if [b[0] for b in image_boxes] == ["bright_spot"]:
            # A cell with only a bright spot has its brightest pixel inside the box,
            # far above the typical brightness of the cell.
            pixels = np.asarray(image)
            _, xmin, ymin, xmax, ymax = image_boxes[0]
            inside = pixels[ymin - 1 : ymax, xmin - 1 : xmax]
            assert inside.max() == pixels.max() >= np.median(pixels) + 60
            checked += 1
    assert checked >= 20


def test_refuses_a_foreign_or_different_folder_and_reuses_an_identical_one(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    with pytest.raises(ValueError, match="foreign"):
        generate_voc(foreign, SyntheticSpec(num_images=5, image_size=32))

    root = tmp_path / "voc"
    spec = SyntheticSpec(num_images=5, image_size=32)
    counts = generate_voc(root, spec)
    # Remove an image: an identical spec must not regenerate anything.
    (root / "JPEGImages" / "syn_00000.png").unlink()
    assert generate_voc(root, spec) == counts
    assert not (root / "JPEGImages" / "syn_00000.png").exists()

    with pytest.raises(ValueError, match="voc"):
        generate_voc(root, SyntheticSpec(num_images=5, image_size=32, seed=1))

    # An interrupted generation has images but no record: refused, not reused.
    (root / "synthetic.json").unlink()
    with pytest.raises(ValueError, match="voc"):
        generate_voc(root, spec)


def test_empty_existing_folder_is_used(tmp_path):
    generate_voc(tmp_path, SyntheticSpec(num_images=3, image_size=32))
    assert (tmp_path / "synthetic.json").is_file()
    assert len(list((tmp_path / "JPEGImages").glob("*.png"))) == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"num_images": 0},
        {"image_size": 31},
        {"imbalance": 0.5},
        {"defect_free_fraction": -0.1},
        {"defect_free_fraction": 1.5},
        {"second_defect_prob": 1.01},
        {"imbalance": float("nan")},
    ],
)
def test_bad_spec_values_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SyntheticSpec(**bad)


def tiny_cnn() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    # Global max pooling, because most defects are small and local.
    return nn.Sequential(
        block(1, 16), block(16, 32), block(32, 64), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(CLASSES))
    )


def test_every_class_is_learnable_by_a_tiny_cnn(tmp_path):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    generate_voc(tmp_path, SyntheticSpec(num_images=900, image_size=64, imbalance=10.0, seed=11))
    stems, labels, _ = read_labels(tmp_path)
    pixels = np.stack([np.asarray(Image.open(tmp_path / "JPEGImages" / f"{s}.png")) for s in stems])
    x = torch.from_numpy(pixels).float().unsqueeze(1)
    # Per-image standardisation removes the generator's global exposure jitter.
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    y = torch.from_numpy(labels)
    split = int(0.75 * len(x))  # images are independent draws, so a prefix split is random

    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(8):
        model.train()
        for batch in torch.randperm(split).split(64):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        scores = model(x[split:]).numpy()
    held_out = labels[split:]
    aucs = {name: roc_auc_score(held_out[:, i], scores[:, i]) for i, name in enumerate(CLASSES)}
    print({name: round(auc, 3) for name, auc in aucs.items()}, "held-out ROC-AUC")
    assert held_out.sum(0).min() >= 5, held_out.sum(0)  # every class has held-out positives
    assert all(auc >= 0.9 for auc in aucs.values()), aucs
