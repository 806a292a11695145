"""Screenshots taken by the GUI tests.

Every grab is checked for real content; it lands in ``$QNS_SCREENSHOT_DIR``
when set (``make screenshots`` sets it to doc/gui, where doc/gui.md shows
them), else in the test's temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from PyQt6 import QtWidgets


def screenshot(widget: QtWidgets.QWidget, name: str, fallback_dir: Path) -> Path:
    """Grab ``widget`` (laid out and painted) to ``<dir>/<name>.png``."""
    QtWidgets.QApplication.processEvents()
    image = widget.grab().toImage()
    assert image.width() > 100 and image.height() > 50, f"{name}: nothing drawn"
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7)
               for y in range(0, image.height(), 7)}
    assert len(colours) > 3, f"{name}: a blank image"
    directory = Path(os.environ.get("QNS_SCREENSHOT_DIR") or fallback_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    assert image.save(str(path)), f"cannot write {path}"
    return path
