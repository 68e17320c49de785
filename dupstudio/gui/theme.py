"""Light or dark, following the system: the window palette, muted text, banner colours and the
plots' background.

The scheme comes from Qt's style hints (the desktop's light/dark setting); ``DUPSTUDIO_THEME``
(``dark`` / ``light``) overrides it. :func:`apply` runs once when the application starts and again
when the desktop switches; widgets built afterwards read :func:`muted` and friends.
"""
from __future__ import annotations

import os
from typing import Optional

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette

_dark: Optional[bool] = None

LIGHT = {"muted": "#5f6368", "panel": "#f3f5f8", "panel_border": "#d0d5dd", "plot_bg": "w", "plot_fg": "k",
         "axis": "#444444", "axis_text": "#222222", "grid_text": "#222222", "pending": "#c8c8c8",
         "table_tint": "#e3efff", "disabled_cell": "#f4f4f4"}
DARK = {"muted": "#a0a6ad", "panel": "#2a2d31", "panel_border": "#41464d", "plot_bg": "#1f2124",
        "plot_fg": "#d6d6d6", "axis": "#9aa0a6", "axis_text": "#d6d6d6", "grid_text": "#d6d6d6",
        "pending": "#555a60", "table_tint": "#213247", "disabled_cell": "#2b2d30"}
BANNERS_LIGHT = {
    "error": ("#fdecea", "#e0a0a0", "#8b0000"),
    "info": ("#e8f1fb", "#a8c6e8", "#1b3d66"),
    "warning": ("#fff6e0", "#e6c677", "#6b4b00"),
}
BANNERS_DARK = {
    "error": ("#4a1f1f", "#8c3b3b", "#ffd7d7"),
    "info": ("#1d3349", "#3d648c", "#d6e8ff"),
    "warning": ("#4a3b12", "#8c7027", "#ffeab0"),
}


def system_is_dark() -> bool:
    """The desktop's setting (Qt's colour scheme; else the palette's window lightness)."""
    forced = os.environ.get("DUPSTUDIO_THEME", "").strip().lower()
    if forced in ("dark", "light"):
        return forced == "dark"
    app = QGuiApplication.instance()
    if app is None:
        return False
    hints = QGuiApplication.styleHints()
    scheme = hints.colorScheme() if hasattr(hints, "colorScheme") else Qt.ColorScheme.Unknown
    if scheme == Qt.ColorScheme.Dark:
        return True
    if scheme == Qt.ColorScheme.Light:
        return False
    return app.palette().color(QPalette.Window).lightness() < 110


def is_dark() -> bool:
    return bool(_dark) if _dark is not None else system_is_dark()


def colors() -> dict:
    return DARK if is_dark() else LIGHT


def muted() -> str:
    """Secondary text (notes, hints)."""
    return colors()["muted"]


def muted_css() -> str:
    return f"QLabel {{ color: {muted()}; }}"


def banner_colors(kind: str) -> tuple:
    table = BANNERS_DARK if is_dark() else BANNERS_LIGHT
    return table.get(kind, table["info"])


def banner_css(kind: str, padding: str = "3px 6px") -> str:
    """The style sheet of a QLabel shown as a strip of the banner colours of ``kind``."""
    bg, border, fg = banner_colors(kind)
    return (f"QLabel {{ background: {bg}; border: 1px solid {border}; color: {fg};"
            f" border-radius: 4px; padding: {padding}; }}")


def dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor("#1e1f22"), QColor("#2b2d30"), QColor("#dfe1e5")
    for group in (QPalette.Active, QPalette.Inactive):
        p.setColor(group, QPalette.Window, window)
        p.setColor(group, QPalette.WindowText, text)
        p.setColor(group, QPalette.Base, base)
        p.setColor(group, QPalette.AlternateBase, QColor("#26282b"))
        p.setColor(group, QPalette.ToolTipBase, QColor("#3c3f41"))
        p.setColor(group, QPalette.ToolTipText, text)
        p.setColor(group, QPalette.Text, text)
        p.setColor(group, QPalette.Button, QColor("#36393d"))
        p.setColor(group, QPalette.ButtonText, text)
        p.setColor(group, QPalette.BrightText, QColor("#ff6b6b"))
        p.setColor(group, QPalette.Highlight, QColor("#3d6fb4"))
        p.setColor(group, QPalette.HighlightedText, QColor("#ffffff"))
        p.setColor(group, QPalette.Link, QColor("#7fb2ff"))
        p.setColor(group, QPalette.PlaceholderText, QColor("#8a8f96"))
        p.setColor(group, QPalette.Light, QColor("#4a4d52"))
        p.setColor(group, QPalette.Midlight, QColor("#3e4145"))
        p.setColor(group, QPalette.Mid, QColor("#303235"))
        p.setColor(group, QPalette.Dark, QColor("#1a1b1d"))
        p.setColor(group, QPalette.Shadow, QColor("#0d0d0e"))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        p.setColor(QPalette.Disabled, role, QColor("#75797f"))
    p.setColor(QPalette.Disabled, QPalette.Base, QColor("#242528"))
    p.setColor(QPalette.Disabled, QPalette.Button, QColor("#2e3033"))
    p.setColor(QPalette.Disabled, QPalette.Window, window)
    return p


def apply(app=None, dark: Optional[bool] = None) -> bool:
    """Set the palette and the plots' colours for the system's scheme (or ``dark``); returns
    whether the dark scheme is on. Plots made afterwards use the new colours."""
    global _dark
    import pyqtgraph as pg
    from PySide6.QtWidgets import QApplication

    app = app or QApplication.instance()
    want = system_is_dark() if dark is None else bool(dark)
    _dark = want
    if app is not None:
        if want:
            app.setStyle("Fusion")  # the native styles ignore a dark palette on some desktops
            app.setPalette(dark_palette())
        else:
            app.setPalette(app.style().standardPalette())
    c = colors()
    pg.setConfigOptions(background=c["plot_bg"], foreground=c["plot_fg"])
    return want


_listeners: list = []


def on_change(callback) -> None:
    """``callback(old_colors, new_colors)`` after the scheme switches (windows restyle themselves)."""
    _listeners.append(callback)


def off_change(callback) -> None:
    if callback in _listeners:
        _listeners.remove(callback)


def switch(app=None, dark: Optional[bool] = None) -> bool:
    """:func:`apply`, then tell the listeners (a live switch, e.g. the desktop's setting changed)."""
    old = dict(colors())
    on = apply(app, dark)
    for cb in list(_listeners):
        try:
            cb(old, colors())
        except RuntimeError:  # a window already deleted
            _listeners.remove(cb)
    return on


def follow_system(app) -> None:
    """Re-apply when the desktop switches between light and dark (Qt 6.5+)."""
    hints = QGuiApplication.styleHints()
    if hasattr(hints, "colorSchemeChanged"):
        hints.colorSchemeChanged.connect(lambda _scheme: switch(app))
