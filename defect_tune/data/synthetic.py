"""Embedded default dataset: synthetic electroluminescence (EL) solar-cell images.

Real EL defect sets are small, licence-restricted or not downloadable in CI, so the
project ships a generator instead. It draws grayscale cells with six visually
distinct defect types at a controllable long-tail imbalance and writes them as an
ordinary Pascal VOC folder, so everything downstream exercises the same reader it
would use on real data:

    ROOT/JPEGImages/syn_00000.png   8-bit grayscale, lossless
    ROOT/Annotations/syn_00000.xml  one <object> per drawn defect
    ROOT/synthetic.json             spec + counts, written last (marks completion)

Every image is drawn from its own generator seeded by (seed, image index), so the
output is byte-identical for a given spec and does not depend on generation order.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump whenever the drawing changes: a folder written by another version holds
# different pixels for the same spec, so it must not be silently reused.
GENERATOR_VERSION = "1"

# Ordered most frequent -> rarest; class i gets weight imbalance ** (-i / (C - 1)).
CLASSES: tuple[str, ...] = (
    "crack",
    "finger_interruption",
    "dark_area",
    "black_core",
    "scratch",
    "bright_spot",
)

RECORD_NAME = "synthetic.json"


@dataclass(frozen=True)
class SyntheticSpec:
    num_images: int = 1200
    image_size: int = 128  # square cells, pixels
    imbalance: float = 30.0  # most frequent / rarest class, exponential profile (CIFAR-10-LT style)
    defect_free_fraction: float = 0.15  # images with no <object> at all
    second_defect_prob: float = 0.15  # chance a defective image gets a second, different class
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        if not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1, got {self.imbalance}")
        for name in ("defect_free_fraction", "second_defect_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")


def class_profile(imbalance: float) -> np.ndarray:
    """Probability of each class being drawn, decaying exponentially by index."""
    weights = imbalance ** (-np.arange(len(CLASSES)) / (len(CLASSES) - 1))
    return weights / weights.sum()


def pick_classes(rng: np.random.Generator, spec: SyntheticSpec) -> list[str]:
    """The defect classes of one image: none, one, or two different ones."""
    if rng.random() < spec.defect_free_fraction:
        return []
    profile = class_profile(spec.imbalance)
    first = int(rng.choice(len(CLASSES), p=profile))
    picked = [first]
    if rng.random() < spec.second_defect_prob:
        rest = profile.copy()
        rest[first] = 0.0
        picked.append(int(rng.choice(len(CLASSES), p=rest / rest.sum())))
    return [CLASSES[i] for i in picked]


# ---------------------------------------------------------------- background


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise varying on a scale of size / cells pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def draw_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free EL cell as floats in ~[0, 1], and the rows of its fingers."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    # Mid-gray leaves headroom for bright spots. Vignetting darkens the edges only,
    # so it never looks like a black core.
    cell = rng.uniform(0.45, 0.62) * (1 - rng.uniform(0.08, 0.22) * (xx**2 + yy**2) / 2)

    if rng.random() < 0.5:  # "poly": mottled grains of different brightness
        texture = rng.uniform(0.04, 0.07) * smooth_noise(rng, size, int(rng.integers(8, 16)))
        texture += 0.025 * smooth_noise(rng, size, size // 4)
    else:  # "mono": nearly uniform
        texture = rng.uniform(0.005, 0.015) * smooth_noise(rng, size, int(rng.integers(4, 8)))
    cell *= 1 + texture

    # Fingers: thin, faint horizontal lines at a fixed pitch.
    pitch = max(3, round(size / rng.uniform(22, 32)))
    finger_rows = np.arange(int(rng.integers(0, pitch)), size, pitch)
    cell[finger_rows, :] *= rng.uniform(0.88, 0.94)

    # Busbars: 2 or 3 evenly spaced dark vertical bands.
    bars = int(rng.integers(2, 4))
    width = max(2, round(size / 40 * rng.uniform(0.8, 1.3)))
    for j in range(bars):
        x = round((j + 0.5) / bars * size + rng.normal(0, size * 0.01)) - width // 2
        cell[:, max(0, x) : x + width] *= rng.uniform(0.4, 0.55)
    return cell, finger_rows


# ------------------------------------------------------------------- defects
# Each function returns a light-change map m: the cell is multiplied by (1 + m),
# so m in [-1, 0) darkens and m > 0 brightens. The bounding box is where the
# light changes by at least VISIBLE; every defect peaks well above that. All take
# the finger rows so they share one signature; only finger interruptions use them.


def line_mask(size: int, lines: list[list[tuple[float, float]]], width: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for points in lines:
        draw.line(points, fill=255, width=width, joint="curve")
    return np.asarray(canvas, dtype=np.float32) / 255


def random_walk(rng, start, angle, steps, step_len, wiggle):
    """A jagged path: each step turns by a random angle, so cracks never look straight."""
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        x, y = points[-1]
        points.append((x + step_len * np.cos(angle), y + step_len * np.sin(angle)))
    return points


def draw_crack(rng, size, finger_rows):
    start = tuple(rng.uniform(0.2, 0.8, 2) * size)
    step = size * rng.uniform(0.03, 0.05)
    trunk = random_walk(rng, start, rng.uniform(0, 2 * np.pi), int(rng.integers(12, 25)), step, 0.45)
    lines = [trunk]
    if rng.random() < 0.4:  # branch off a middle vertex at a sharp angle
        k = int(rng.integers(len(trunk) // 3, 2 * len(trunk) // 3 + 1))
        dx, dy = np.subtract(trunk[k], trunk[k - 1])
        angle = np.arctan2(dy, dx) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch = random_walk(rng, trunk[k], angle, len(trunk) // 2, step, 0.45)
        lines.append(branch)
    width = max(1, round(size / 80))
    return -rng.uniform(0.6, 0.8) * line_mask(size, lines, width)


def draw_finger_interruption(rng, size, finger_rows):
    # A cluster of short, thick dark dashes sitting on neighbouring finger lines:
    # horizontal and short, unlike the long oblique scratches.
    centre_x, centre_y = rng.uniform(0.15, 0.85, 2) * size
    near = finger_rows[np.abs(finger_rows - centre_y) < size * 0.2]
    if len(near) == 0:
        near = np.array([round(centre_y)])
    rows = rng.choice(near, size=min(len(near), int(rng.integers(3, 7))), replace=False)
    height = max(2, round(size / 50))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for row in rows:
        length = size * rng.uniform(0.08, 0.16)
        x0 = centre_x + rng.normal(0, size * 0.06) - length / 2
        draw.rectangle([x0, row - height // 2, x0 + length, row - height // 2 + height - 1], fill=255)
    return -rng.uniform(0.55, 0.75) * np.asarray(canvas, dtype=np.float32) / 255


def draw_dark_area(rng, size, finger_rows):
    # Off-centre so it cannot pass for a black core; a rotated ellipse, blurred.
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(0.25, 0.45) * size
    cx, cy = size / 2 + radius * np.cos(angle), size / 2 + radius * np.sin(angle)
    a, b = rng.uniform(0.14, 0.26, 2) * size
    tilt = rng.uniform(0, np.pi)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    px = cx + a * np.cos(t) * np.cos(tilt) - b * np.sin(t) * np.sin(tilt)
    py = cy + a * np.cos(t) * np.sin(tilt) + b * np.sin(t) * np.cos(tilt)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(px, py)), fill=255)
    canvas = canvas.filter(ImageFilter.GaussianBlur(size * 0.04))
    mask = np.asarray(canvas, dtype=np.float32) / 255
    return -rng.uniform(0.5, 0.7) * mask / max(mask.max(), 1e-6)


def draw_black_core(rng, size, finger_rows):
    # Centred, darkest in the middle and fading outwards: the inverse of vignetting.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.03, 2)
    radius = size * rng.uniform(0.18, 0.3)
    r = np.hypot(xx - cx, yy - cy) / radius
    return -rng.uniform(0.5, 0.7) * np.exp(-(r ** rng.uniform(2, 3)))


def draw_scratch(rng, size, finger_rows):
    # 2-4 long, straight, parallel thin lines, always oblique (never along fingers
    # or busbars).
    angle = rng.uniform(np.radians(20), np.radians(70)) + rng.choice([0, np.pi / 2])
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.3, 0.7, 2) * size
    half = size * rng.uniform(0.18, 0.35)
    gap = max(2.0, size * rng.uniform(0.025, 0.045))
    count = int(rng.integers(2, 5))
    lines = []
    for k in range(count):
        mid = centre + (k - (count - 1) / 2) * gap * normal
        lines.append([tuple(mid - half * direction), tuple(mid + half * direction)])
    return -rng.uniform(0.4, 0.55) * line_mask(size, lines, 1)


def draw_bright_spot(rng, size, finger_rows):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    radius = size * rng.uniform(0.025, 0.045)
    # Peak gain well above 1 so the centre saturates to white.
    return rng.uniform(1.2, 1.8) * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2))


DRAW = {
    "crack": draw_crack,
    "finger_interruption": draw_finger_interruption,
    "dark_area": draw_dark_area,
    "black_core": draw_black_core,
    "scratch": draw_scratch,
    "bright_spot": draw_bright_spot,
}


VISIBLE = 0.2  # a 20 % change in brightness stands out from texture and grain


def bounding_box(light_change: np.ndarray) -> tuple[int, int, int, int]:
    """VOC box (xmin, ymin, xmax, ymax), 1-based and inclusive, of the visible defect."""
    ys, xs = np.nonzero(np.abs(light_change) >= VISIBLE)
    return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


def draw_cell(
    rng: np.random.Generator, size: int, classes: list[str]
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """One uint8 EL image with the given defects, and each defect's bounding box."""
    cell, finger_rows = draw_background(rng, size)
    boxes = []
    for name in classes:
        light_change = DRAW[name](rng, size, finger_rows)
        cell *= 1 + light_change
        boxes.append((name, bounding_box(light_change)))
    # Exposure differences between cameras/shots, applied after the defects so the
    # defect contrast varies with them.
    mean = cell.mean()
    cell = (cell - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.85, 1.1)
    cell += rng.normal(0, rng.uniform(0.01, 0.025), cell.shape)  # sensor grain
    return np.round(np.clip(cell, 0, 1) * 255).astype(np.uint8), boxes


# -------------------------------------------------------------------- VOC I/O


def annotation_xml(filename: str, size: int, boxes) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 1)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (xmin, ymin, xmax, ymax) in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def generate_voc(root: Path, spec: SyntheticSpec) -> dict[str, int]:
    """Write the VOC folder; return images per class (positives).

    Deterministic: the same spec gives the same bytes. If ``root`` already holds a
    complete generation of this exact spec (by this generator version), nothing is
    written and the recorded counts are returned.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        return reuse_existing(root, spec)

    images_dir, annotations_dir = root / "JPEGImages", root / "Annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(exist_ok=True)
    counts = {name: 0 for name in CLASSES}
    for index in range(spec.num_images):
        rng = np.random.default_rng([spec.seed, index])
        classes = pick_classes(rng, spec)
        pixels, boxes = draw_cell(rng, spec.image_size, classes)
        stem = f"syn_{index:05d}"
        Image.fromarray(pixels).save(images_dir / f"{stem}.png")
        annotation_xml(f"{stem}.png", spec.image_size, boxes).write(
            annotations_dir / f"{stem}.xml", encoding="utf-8"
        )
        for name in classes:
            counts[name] += 1

    # Written last and atomically: its presence means every image is on disk.
    record = {"generator_version": GENERATOR_VERSION, "spec": asdict(spec), "counts": counts}
    partial = root / (RECORD_NAME + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, root / RECORD_NAME)
    return counts


def reuse_existing(root: Path, spec: SyntheticSpec) -> dict[str, int]:
    record_path = root / RECORD_NAME
    if not record_path.is_file():
        raise ValueError(
            f"{root} is not empty and holds no {RECORD_NAME} (a foreign folder or an "
            "interrupted generation); remove it or choose another root"
        )
    record = json.loads(record_path.read_text())
    if record.get("spec") != asdict(spec) or record.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(
            f"{root} holds a synthetic dataset of another spec or generator version "
            f"({record.get('spec')}, version {record.get('generator_version')}); "
            "remove it or choose another root"
        )
    return {name: int(record["counts"][name]) for name in CLASSES}
