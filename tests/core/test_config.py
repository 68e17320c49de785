"""Configuration schema: JSON round trip, sidecar, validation messages."""
import errno
import json
import os
import stat

import mlx.core as mx
import numpy as np
import pytest

from dupstudio.core import config as C
from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import model_shape


@pytest.fixture(scope="module")
def shape(tiny_loaded):
    return model_shape(tiny_loaded.config)


def test_json_round_trip_is_lossless(tmp_path, shape):
    cfg = C.new_config(shape, replicas=3, mode="parallel", layers=[0, 2], init="gamma",
                       granularity="channel", strategy="percentile", strategy_args={"p": 99.0})
    cfg.blocks[1].bits, cfg.blocks[1].group_size = 3, 32
    cfg.blocks[2].residual_gain = 0.75
    cfg.tensors = {"b0.r1.q_proj.ch_scale": mx.arange(256).astype(mx.float16)}
    p = C.save(cfg, tmp_path / "c.json")
    back = C.load(p, shape)
    assert back.to_dict() | {"tensors": None} == cfg.to_dict() | {"tensors": None}
    assert np.array_equal(np.array(back.tensors["b0.r1.q_proj.ch_scale"]),
                          np.array(cfg.tensors["b0.r1.q_proj.ch_scale"]))
    # saving the loaded one again gives the same JSON text
    p2 = C.save(back, tmp_path / "d.json")
    a, b = json.loads(p.read_text()), json.loads(p2.read_text())
    assert a["tensors"]["sha256"] == b["tensors"]["sha256"]
    a["tensors"] = b["tensors"] = None
    assert a == b


def _write(tmp_path, d):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    (lambda d: d["blocks"][0].update(replicas=7), "K must be 1-4"),
    (lambda d: d["blocks"][0].update(index=12), "beyond the model"),
    (lambda d: d["model"].update(fingerprint="0123456789abcdef"), "made for another model"),
    (lambda d: d.update(schema_version=99), "newer than this dupstudio"),
    (lambda d: d["blocks"][0].update(mode="diagonal"), "must be 'serial' or 'parallel'"),
    (lambda d: d["defaults"].update(strategy="magic"), "unknown strategy 'magic'"),
    (lambda d: d["defaults"].update(group_size=48), "expected one of 32, 64, 128, got the number 48"),
    (lambda d: d["blocks"][1]["replica"][0].update(init="random"), "got the string 'random'"),
])
def test_bad_configurations_name_the_problem(tmp_path, shape, mutate, message):
    d = C.new_config(shape, replicas=2).to_dict()
    mutate(d)
    with pytest.raises(DupstudioError, match=message):
        C.load(_write(tmp_path, d), shape)


def test_malformed_json(tmp_path, shape):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DupstudioError, match="malformed JSON at line 1"):
        C.load(p, shape)


def test_sidecar_missing_or_changed(tmp_path, shape):
    cfg = C.new_config(shape)
    cfg.tensors = {"b0.r0.q_proj.row_gain": mx.ones((256,))}
    p = C.save(cfg, tmp_path / "c.json")
    side = tmp_path / json.loads(p.read_text())["tensors"]["file"]
    side.write_bytes(side.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DupstudioError, match="sha256"):
        C.load(p, shape)
    side.unlink()
    with pytest.raises(DupstudioError, match="missing"):
        C.load(p, shape)


def test_older_version_is_migrated_with_a_note(tmp_path, shape):
    d = C.new_config(shape, replicas=2).to_dict()
    d["schema_version"] = 0
    for b in d["blocks"]:
        b["alpha"] = b.pop("gains")
        b.pop("residual_gain")
    cfg = C.load(_write(tmp_path, d), shape)
    assert cfg.blocks[0].gains == [1.0, 1.0]
    assert "migrated" in cfg.provenance["notes"][0]


def test_sparse_block_list_defaults_to_k1(tmp_path, shape):
    d = C.new_config(shape).to_dict()
    d["blocks"] = [{"index": 1, "replicas": 2, "mode": "parallel", "replica": [{}, {}]}]
    cfg = C.load(_write(tmp_path, d), shape)
    assert [b.replicas for b in cfg.blocks] == [1, 2, 1]
    assert cfg.blocks[1].gains == [0.5, 0.5]


def test_save_is_atomic_on_failure(tmp_path, shape, monkeypatch):
    cfg = C.new_config(shape)
    p = C.save(cfg, tmp_path / "c.json")
    before = p.read_text()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", boom)
    cfg.blocks[0].residual_gain = 0.5
    with pytest.raises(DupstudioError, match="c.json: cannot write: the disk is full"):
        C.save(cfg, p)
    assert p.read_text() == before
    assert [x.name for x in tmp_path.iterdir()] == ["c.json"]


def test_parse_layers():
    assert C.parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    with pytest.raises(DupstudioError, match="beyond the model"):
        C.parse_layers("0-30", 30)


# ------------------------------------------------------------------ nothing lost, nothing hangs
def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_huge_num_blocks_is_refused_before_filling(tmp_path, shape):
    d = C.new_config(shape).to_dict()
    d["model"]["num_blocks"] = 1_000_000_000
    with pytest.raises(DupstudioError, match=r"model.num_blocks: 1000000000 is out of range \(1-4096\)"):
        C.load(_write(tmp_path, d))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["blocks"][0].update(gains=["x", 1.0]), r"blocks\[0\].gains\[0\]: expected a finite number .* the string 'x'"),
    (lambda d: d["blocks"][0].update(gains=None), r"blocks\[0\].gains: expected a list of 2, got null"),
    (lambda d: d["model"].update(num_blocks="30"), r"model.num_blocks: expected an integer, got the string '30'"),
    (lambda d: d["blocks"][0].update(calibration="x"), r"blocks\[0\].calibration: expected an object or null"),
    (lambda d: d["embedding"].update(group_size=0), r"embedding.group_size: expected one of 32, 64, 128, got the number 0"),
    (lambda d: d.update(schema_version=-1), r"schema_version: -1 is not a schema version"),
    (lambda d: d["blocks"][0].update(bits=0), r"blocks\[0\].bits: expected one of 2, 3, 4, 8 \(or omit it"),
    (lambda d: d["blocks"][0].update(group_size=0), r"blocks\[0\].group_size: expected one of 32, 64, 128 \(or omit"),
    (lambda d: d["blocks"][0].update(replicas=True), r"blocks\[0\].replicas: expected an integer K in 1-4, got the boolean true"),
    (lambda d: d["blocks"][0].update(gains=[1.0, float("nan")]), r"gains\[1\]: expected a finite number .* nan"),
    (lambda d: d["blocks"][0].update(residual_gain=float("inf")), r"residual_gain: expected a finite number"),
    (lambda d: d["defaults"].update(bits="2"), r"defaults.bits: expected one of 2, 3, 4, 8, got the string '2'"),
    (lambda d: d["defaults"].update(strategy_args={"q": 1}), r"defaults.strategy_args: unknown argument 'q'"),
    (lambda d: d["blocks"][0].update(index=[0]), r"blocks\[0\].index: expected an integer, got a list"),
    (lambda d: d["blocks"][0]["replica"][1].update(init="gamma", init_args={"gamma": -1}), r"init_args.gamma: expected a number in \(0, 10\]"),
    (lambda d: d.update(tensors={"file": "../x.safetensors", "sha256": "0" * 64}), r"tensors.file: expected the name of a file"),
    (lambda d: d.update(blocks={"0": {}}), r"blocks: expected a list of at most 3 block entries"),
])
def test_wrong_types_give_one_line_errors(tmp_path, shape, mutate, message):
    d = C.new_config(shape, replicas=2).to_dict()
    mutate(d)
    with pytest.raises(DupstudioError, match=message) as e:
        C.load(_write(tmp_path, d), shape)
    _one_line(e)


def test_deeply_nested_json_is_one_line(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DupstudioError, match="nested too deeply"):
        C.load(p)
    p.write_text('{"schema_version": ' + "9" * 5000 + "}")
    with pytest.raises(DupstudioError, match="malformed JSON"):
        C.load(p)


def test_new_config_refuses_nonsense(shape):
    with pytest.raises(DupstudioError, match="replicas: K must be 1-4, got the number -1"):
        C.new_config(shape, replicas=-1)
    with pytest.raises(DupstudioError, match="'2-0' is an empty range"):
        C.parse_layers("2-0", 3)
    with pytest.raises(DupstudioError, match="unknown argument 'bogus'"):
        C.new_config(shape, strategy="percentile", strategy_args={"bogus": 1})
    with pytest.raises(DupstudioError, match=r"strategy_args.p: expected a number in \(50, 100\]"):
        C.new_config(shape, strategy="percentile", strategy_args={"p": 30})


def _calibrated(shape):
    cfg = C.new_config(shape)
    cfg.tensors = {"b0.r0.q_proj.row_gain": mx.ones((256,))}
    return cfg


def test_saving_never_deletes_another_configs_sidecar(tmp_path, shape):
    """calibrate exp.json --out exp.cal.json, then calibrate exp.cal.json --out exp.json."""
    C.save(C.new_config(shape), tmp_path / "exp.json")
    cal = _calibrated(shape)
    C.save(cal, tmp_path / "exp.cal.json")
    cal_side = tmp_path / json.loads((tmp_path / "exp.cal.json").read_text())["tensors"]["file"]
    again = C.load(tmp_path / "exp.cal.json", shape)
    again.tensors = {"b0.r0.q_proj.row_gain": 2 * mx.ones((256,))}
    C.save(again, tmp_path / "exp.json")
    assert cal_side.is_file()
    C.load(tmp_path / "exp.cal.json", shape)  # still loads
    # the sidecar exp.json itself owned is replaced when exp.json is saved again
    own = tmp_path / json.loads((tmp_path / "exp.json").read_text())["tensors"]["file"]
    again.tensors = {"b0.r0.q_proj.row_gain": 3 * mx.ones((256,))}
    C.save(again, tmp_path / "exp.json")
    assert not own.exists() and cal_side.is_file()
    # a copied JSON references exp.cal's sidecar but never owned it
    (tmp_path / "copy.json").write_text((tmp_path / "exp.cal.json").read_text())
    C.save(C.new_config(shape), tmp_path / "copy.json")
    assert cal_side.is_file()


def test_saved_files_get_the_umask_mode(tmp_path, shape):
    old = os.umask(0o022)
    try:
        p = C.save(_calibrated(shape), tmp_path / "c.json")
        side = tmp_path / json.loads(p.read_text())["tensors"]["file"]
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        assert stat.S_IMODE(side.stat().st_mode) == 0o644
        os.chmod(p, 0o640)  # a replaced file keeps its mode
        C.save(C.load(p, shape), p)
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_saving_through_a_symlink_writes_the_target(tmp_path, shape):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    C.save(C.new_config(shape), real_dir / "c.json")
    link = tmp_path / "link.json"
    link.symlink_to(real_dir / "c.json")
    C.save(_calibrated(shape), link)
    assert link.is_symlink() and os.readlink(link) == str(real_dir / "c.json")
    side = json.loads((real_dir / "c.json").read_text())["tensors"]["file"]
    assert (real_dir / side).is_file()
    assert C.load(link, shape).tensors  # the sidecar is found beside the real file


@pytest.mark.parametrize("where", ["/proc/c.json", "FILE/c.json"])
def test_unwritable_output_is_one_line(tmp_path, shape, where):
    (tmp_path / "FILE").write_text("x")
    target = where.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(DupstudioError, match=r"cannot (write|create)") as e:
        C.save(C.new_config(shape), target)
    text = _one_line(e)
    if "FILE" in where:
        assert "is a file, not a folder" in text


def test_disk_full_while_writing_the_sidecar_keeps_the_old_files(tmp_path, shape, monkeypatch):
    p = C.save(_calibrated(shape), tmp_path / "c.json")
    before = {x.name: x.read_bytes() for x in tmp_path.iterdir()}

    def full(f, arrays):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    cfg = C.load(p, shape)
    cfg.tensors = {"b0.r0.q_proj.row_gain": 5 * mx.ones((256,))}
    with pytest.raises(DupstudioError, match="disk is full"):
        C.save(cfg, p)
    assert {x.name: x.read_bytes() for x in tmp_path.iterdir()} == before


def test_stale_temporary_files_of_dead_runs_are_removed(tmp_path, shape, capsys):
    from dupstudio.core import safeio

    dead = _dead_pid()
    stale = tmp_path / f".c.json.tmp-{dead}-0123abcd.json"
    stale.write_bytes(b"")
    live = tmp_path / f".c.json.tmp-{os.getpid()}-0123abcd.json"
    live.write_bytes(b"")
    keep = tmp_path / ".c.json.notes"
    keep.write_bytes(b"")
    safeio._swept.discard(str(tmp_path.absolute()))
    C.save(C.new_config(shape), tmp_path / "c.json")
    assert not stale.exists() and live.exists() and keep.exists()
    err = capsys.readouterr().err
    assert err.count("removed 1 temporary file(s)") == 1 and stale.name in err


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
