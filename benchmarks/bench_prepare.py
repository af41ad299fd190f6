"""`prepare` throughput against a plain PIL decode-and-resize loop over the same images.

    python benchmarks/bench_prepare.py [--source DIR] [--image-size 224] [--repeats 3]
        [--write results/benchmarks/prepare_throughput.md]

Source: NEU-DET from ../shared/datasets when present, else the synthetic default (1,200 images).
Every variant runs in this one process invocation, alternating, best of `--repeats`; the table
prints images/s and the ratio to the plain loop.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import NEU_DET
from PIL import Image

from defect_tune.data.prepare import PrepareOptions, prepare
from defect_tune.data.readers import read_voc
from defect_tune.data.synthetic import SyntheticSpec, generate_voc


def plain_loop(paths: list[Path], size: int) -> float:
    """What a hand-written script does: open, grayscale, resize, to numpy. Seconds."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return time.perf_counter() - started


def run_prepare(source: Path, size: int, workers: int, scratch: Path) -> tuple[float, float]:
    out = scratch / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    meta = prepare(PrepareOptions(source=source, format="voc", out=out, image_size=size, workers=workers))
    return time.perf_counter() - started, meta["throughput"]["decode_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        source = args.source
        if source is None and (NEU_DET / "Annotations").is_dir():
            source = NEU_DET
        if source is None:
            source = scratch / "synthetic"
            generate_voc(source, SyntheticSpec(num_images=1200, image_size=200))
        paths = [item.path for item in read_voc(source).items]
        cores = os.cpu_count() or 1
        timings: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            timings.setdefault("plain PIL loop, 1 process", []).append(plain_loop(paths, args.image_size))
            for workers in sorted({1, cores}):
                total, decode = run_prepare(source, args.image_size, workers, scratch)
                timings.setdefault(f"prepare, {workers} worker(s), end to end", []).append(total)
                timings.setdefault(f"prepare, {workers} worker(s), decode phase", []).append(decode)

    baseline = len(paths) / min(timings["plain PIL loop, 1 process"])
    lines = [
        f"# prepare throughput: {len(paths)} images of {source.name} to {args.image_size}px grayscale",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}. "
        f"Date: {datetime.date.today().isoformat()}. Best of {args.repeats}, variants alternating in one run.",
        f"Command: `python benchmarks/bench_prepare.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| variant | images/s | ratio to plain loop |",
        "|---|---:|---:|",
    ]
    for name, seconds in timings.items():
        rate = len(paths) / min(seconds)
        lines.append(f"| {name} | {rate:,.0f} | {rate / baseline:.2f} |")
    lines += [
        "",
        "End to end includes reading the annotations, hashing every file, the stratified split and",
        "writing the Parquet shards; the plain loop only decodes and resizes.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
