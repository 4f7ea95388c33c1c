"""Write a demo .npz for data=npz_images: 28 x 28 grey images of ten simple shapes, one class
each, at jittered places and sizes over faint noise. Needs only numpy.

    python examples/my_vae/make_npz.py examples/shapes.npz                  # 5,000 train, 1,000 test
    python examples/my_vae/make_npz.py tiny.npz --train 96 --test 32 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIDE = 28
CLASSES = ("square", "frame", "hbar", "vbar", "plus", "cross", "disc", "ring", "triangle", "dots")


def shape(k: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean 28 x 28 mask of shape class ``k``, its centre and size jittered."""
    rows, cols = np.mgrid[0:SIDE, 0:SIDE].astype(float)
    cy, cx = 14 + rng.uniform(-3, 3, size=2)
    r = rng.uniform(6, 9)  # half-size
    dy, dx = rows - cy, cols - cx
    box = (abs(dy) <= r) & (abs(dx) <= r)
    if k == 0:
        return box
    if k == 1:
        return box & ~((abs(dy) <= r - 2.5) & (abs(dx) <= r - 2.5))
    if k == 2:
        return (abs(dy) <= 2) & (abs(dx) <= r + 3)
    if k == 3:
        return (abs(dx) <= 2) & (abs(dy) <= r + 3)
    if k == 4:
        return box & ((abs(dy) <= 1.5) | (abs(dx) <= 1.5))
    if k == 5:
        return box & ((abs(dy - dx) <= 2) | (abs(dy + dx) <= 2))
    distance = np.hypot(dy, dx)
    if k == 6:
        return distance <= r
    if k == 7:
        return (distance <= r) & (distance >= r - 2.5)
    if k == 8:
        return (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)
    return (np.hypot(dy, dx + r / 1.5) <= 3) | (np.hypot(dy, dx - r / 1.5) <= 3)


def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (n, 28, 28) and their labels, class k for image i when i % 10 == k."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 30, size=(n, SIDE, SIDE)).astype(np.uint8)
    for image, k in zip(images, labels):
        image[shape(int(k), rng)] = rng.integers(200, 256)
    return images, labels.astype(np.uint8)


def write(path: str | Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x_train, y_train = make(n_train, seed)
    x_test, y_test = make(n_test, seed + 1)
    with open(path, "wb") as out:  # np.savez_compressed would add .npz to a name without it
        np.savez_compressed(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                            classes=np.array(CLASSES))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the .npz file to write, e.g. examples/shapes.npz")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write(args.path, args.train, args.test, args.seed)
    print(f"Wrote {path}: {args.train} training and {args.test} test images of {len(CLASSES)} shapes "
          f"({', '.join(CLASSES)}).")


if __name__ == "__main__":
    main()
