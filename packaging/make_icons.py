"""Render the application icon: ``resources/icons/dupstudio.svg`` -> PNGs and ``dupstudio.icns``.

    python packaging/make_icons.py          # rewrites resources/icons/dupstudio-<N>.png and .icns

Rendering uses Qt's QSvgRenderer on the offscreen platform (no display needed). The .icns
container is written here rather than with Apple's ``iconutil`` (macOS only), so the icons can be
rebuilt on Linux too. The format: the magic ``b"icns"`` and the file's total length (big-endian
uint32), then entries of a four-character type, the entry's length including its 8-byte header,
and a PNG image (accepted for every type used below since macOS 10.7).
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ICONS = ROOT / "resources" / "icons"
SVG = ICONS / "dupstudio.svg"
ICNS = ICONS / "dupstudio.icns"
SIZES = (16, 32, 48, 64, 128, 256, 512, 1024)

# icns type -> pixel size of its PNG (the @2x types hold the doubled size).
ICNS_TYPES = (
    ("icp4", 16), ("icp5", 32), ("icp6", 64),
    ("ic07", 128), ("ic08", 256), ("ic09", 512), ("ic10", 1024),  # ic10 = 512@2x
    ("ic11", 32), ("ic12", 64), ("ic13", 256), ("ic14", 512),  # 16@2x, 32@2x, 128@2x, 256@2x
)


def png_path(size: int) -> Path:
    return ICONS / f"dupstudio-{size}.png"


def render_pngs(svg: Path = SVG, sizes=SIZES) -> list[Path]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(["make_icons"])  # noqa: F841 (keep alive)
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"{svg}: not a valid SVG for Qt")
    out = []
    for size in sizes:
        img = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
        img.fill(Qt.GlobalColor.transparent)
        p = QPainter(img)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        renderer.render(p)
        p.end()
        path = png_path(size)
        if not img.convertToFormat(QImage.Format.Format_ARGB32).save(str(path), "PNG"):
            raise SystemExit(f"could not write {path}")
        out.append(path)
    return out


def build_icns(entries: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(t.encode("ascii") + struct.pack(">I", len(d) + 8) + d for t, d in entries)
    return b"icns" + struct.pack(">I", len(body) + 8) + body


def parse_icns(data: bytes) -> list[tuple[str, bytes]]:
    """The (type, payload) entries of an .icns file; raises ValueError when malformed."""
    if len(data) < 8 or data[:4] != b"icns":
        raise ValueError("not an icns file (no 'icns' magic)")
    (total,) = struct.unpack(">I", data[4:8])
    if total != len(data):
        raise ValueError(f"icns header says {total} bytes, file has {len(data)}")
    entries, pos = [], 8
    while pos < total:
        if pos + 8 > total:
            raise ValueError(f"truncated entry header at offset {pos}")
        kind = data[pos:pos + 4].decode("ascii")
        (length,) = struct.unpack(">I", data[pos + 4:pos + 8])
        if length < 8 or pos + length > total:
            raise ValueError(f"entry {kind!r} at offset {pos} has a bad length {length}")
        entries.append((kind, data[pos + 8:pos + length]))
        pos += length
    return entries


def png_size(png: bytes) -> tuple[int, int]:
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def write_icns(path: Path = ICNS) -> Path:
    entries = [(t, png_path(size).read_bytes()) for t, size in ICNS_TYPES]
    path.write_bytes(build_icns(entries))
    for (t, size), (t2, d) in zip(ICNS_TYPES, parse_icns(path.read_bytes())):
        assert t == t2 and png_size(d) == (size, size), (t, size)
    return path


def main() -> int:
    pngs = render_pngs()
    icns = write_icns()
    for p in [*pngs, icns]:
        print(f"wrote {p.relative_to(ROOT)} ({p.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
