"""Packaging: the PyInstaller spec, the icons, the bundled model's licence, example
configurations, and - with DUPSTUDIO_TEST_PACKAGE=1, since the build takes minutes - the real
bundle: `make package`, its `--self-test`, and the first-start conversion of the bundled GGUF."""
from __future__ import annotations

import importlib.util
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
ICONS = ROOT / "resources" / "icons"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def make_icons():
    return _load("dupstudio_make_icons", PACKAGING / "make_icons.py")


# ---------------------------------------------------------------------------- fast, always
def test_packaging_files_present():
    for rel in ("dupstudio.spec", "dupstudio_main.py", "pyi_rth_dupstudio.py", "entitlements.plist",
                "make_icons.py", "README.md"):
        assert (PACKAGING / rel).is_file(), rel
    spec = (PACKAGING / "dupstudio.spec").read_text(encoding="utf-8")
    for needle in ('collect_all("mlx")', 'collect_submodules("mlx_lm.models")', "BUNDLE(",
                   '"LSMinimumSystemVersion": "13.5"', '"NSHighResolutionCapable": True',
                   "org.dupstudio.app", "pyi_rth_dupstudio.py", "dupstudio.icns", "resources/models"):
        assert needle in spec, needle
    compile(spec, "dupstudio.spec", "exec")  # valid Python
    ents = plistlib.loads((PACKAGING / "entitlements.plist").read_bytes())
    assert ents and all(k.startswith("com.apple.security.cs.") and v is True for k, v in ents.items())
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\npackage:" in make and "packaging/dupstudio.spec" in make


def test_icon_pngs(make_icons):
    assert (ICONS / "dupstudio.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    for size in (16, 32, 64, 128, 256, 512, 1024):
        png = (ICONS / f"dupstudio-{size}.png").read_bytes()
        assert make_icons.png_size(png) == (size, size)


def test_icns_parses(make_icons):
    data = (ICONS / "dupstudio.icns").read_bytes()
    assert data[:4] == b"icns" and int.from_bytes(data[4:8], "big") == len(data)
    entries = make_icons.parse_icns(data)
    kinds = [k for k, _ in entries]
    for need in ("ic07", "ic08", "ic09", "ic10"):
        assert need in kinds
    expected = dict(make_icons.ICNS_TYPES)
    for kind, payload in entries:
        assert make_icons.png_size(payload) == (expected[kind], expected[kind]), kind


def test_icns_writer_roundtrip(make_icons):
    png = (ICONS / "dupstudio-16.png").read_bytes()
    blob = make_icons.build_icns([("icp4", png), ("ic11", png)])
    assert make_icons.parse_icns(blob) == [("icp4", png), ("ic11", png)]
    with pytest.raises(ValueError):
        make_icons.parse_icns(blob[:-3])  # length in the header no longer matches
    with pytest.raises(ValueError):
        make_icons.parse_icns(b"icnx" + blob[4:])


def test_bundled_model_licence_and_example_configs():
    licence = (ROOT / "resources" / "models" / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence
    assert not list((ROOT / "resources" / "models").glob("*.gguf")), "the GGUF is not kept in git"
    from dupstudio.core import config as C

    seen = {}
    for path in sorted((ROOT / "resources" / "configs").glob("*.json")):
        cfg = C.load(path)
        assert cfg.model.source == "default" and cfg.model.num_blocks == 30
        assert {b.index for b in cfg.blocks} == set(range(30))
        seen[path.name] = [(b.replicas, b.mode) for b in cfg.blocks]
    assert set(r for r, _ in seen["smollm2-2bit-k1.json"]) == {1}
    assert set(seen["smollm2-2bit-k2-serial.json"]) == {(2, "serial")}
    par = seen["smollm2-2bit-k2-parallel-blocks0-3.json"]
    assert par[:4] == [(2, "parallel")] * 4 and {r for r, _ in par[4:]} == {1}


def test_runtime_hook_points_at_bundled_gguf(tmp_path, monkeypatch):
    models = tmp_path / "resources" / "models"
    models.mkdir(parents=True)
    (models / GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    for name in ("DUPSTUDIO_DEFAULT_GGUF", "DUPSTUDIO_BUNDLED_GGUF"):
        monkeypatch.setenv(name, "")  # records the old value, so what the hook sets is undone
        monkeypatch.delenv(name)
    _load("pyi_rth_dupstudio_test", PACKAGING / "pyi_rth_dupstudio.py")
    assert os.environ["DUPSTUDIO_DEFAULT_GGUF"] == str(models / GGUF_NAME)
    assert os.environ["DUPSTUDIO_BUNDLED_GGUF"] == str(models / GGUF_NAME)
    # a value the user set wins
    monkeypatch.setenv("DUPSTUDIO_DEFAULT_GGUF", "/elsewhere/model.gguf")
    _load("pyi_rth_dupstudio_test2", PACKAGING / "pyi_rth_dupstudio.py")
    assert os.environ["DUPSTUDIO_DEFAULT_GGUF"] == "/elsewhere/model.gguf"


def test_failed_bundled_conversion_is_explained(tmp_path, monkeypatch):
    from dupstudio.core import model_io
    from dupstudio.core.jobs import DupstudioError

    gguf = tmp_path / GGUF_NAME
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(model_io, "ensure_converted", model_io.ensure_converted)  # restored after
    monkeypatch.setenv("DUPSTUDIO_BUNDLED_GGUF", str(gguf))
    monkeypatch.setenv("DUPSTUDIO_HOME", str(blocker / "home"))  # cannot be created
    entry = _load("dupstudio_main_test", PACKAGING / "dupstudio_main.py")
    entry._explain_bundled_conversion_failures()
    with pytest.raises(DupstudioError) as e:
        model_io.ensure_converted(gguf)
    msg = str(e.value)
    assert "could not convert the bundled default model" in msg and "DUPSTUDIO_HOME" in msg
    other = tmp_path / "other.gguf"  # other models keep their own errors
    other.write_bytes(b"GGUF")
    with pytest.raises(Exception) as e2:
        model_io.ensure_converted(other)
    assert "could not convert the bundled" not in str(e2.value)


# ---------------------------------------------------------------------------- the real bundle
def _bundle_executable() -> Path:
    if sys.platform == "darwin":
        return ROOT / "dist" / "dupstudio.app" / "Contents" / "MacOS" / "dupstudio"
    return ROOT / "dist" / "dupstudio" / "dupstudio"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DUPSTUDIO_TEST_PACKAGE") != "1",
                    reason="builds the bundle (minutes): set DUPSTUDIO_TEST_PACKAGE=1")
def test_make_package_and_bundle_self_test(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    build = subprocess.run(["make", "package"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    exe = _bundle_executable()
    assert exe.is_file(), exe
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", DUPSTUDIO_HOME=str(tmp_path / "home"))
    r = subprocess.run([str(exe), "--self-test"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("dupstudio self-test: OK") and "bundled model" in line, line

    # First start: the bundled GGUF (not an installed package) is converted into the cache.
    env.pop("DUPSTUDIO_DEFAULT_GGUF", None)
    r = subprocess.run([str(exe), "info", "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    converted = list((tmp_path / "home" / "models").glob("SmolLM2-135M-Instruct.Q4_1-*"))
    assert converted and (converted[0] / "model.safetensors").is_file()
    assert "converting" in r.stderr.lower() or "converted" in r.stderr.lower()
