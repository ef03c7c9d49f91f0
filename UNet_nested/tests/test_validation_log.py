"""The validation log line says what its HD95 mean leaves out."""

from __future__ import annotations

import train


class Printer:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, *values) -> None:
        self.lines.append(" ".join(map(str, values)))


def test_hd95_line_names_the_images_it_left_out():
    out = Printer()
    out.dist = type("Dist", (), {"rank": 0})()
    val = {"loss": 0.5, "jaccard_mean": 0.8, "dice_mean": 0.85, "hd95_mean": 3.0, "hd95_excluded": 2.0,
           "n_images": 10.0}  # fmt: skip
    train.print_validation(out, val, 10)
    assert "HD95 3.00 (2 of 10 images left out)" in out.lines[0]
