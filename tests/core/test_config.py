"""Configuration schema: JSON round trip, sidecar, validation messages."""
import json

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
    (lambda d: d["defaults"].update(group_size=48), "does not divide"),
    (lambda d: d["blocks"][1]["replica"][0].update(init="random"), "unknown 'random'"),
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
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "fsync", boom)
    cfg.blocks[0].residual_gain = 0.5
    with pytest.raises(OSError):
        C.save(cfg, p)
    assert p.read_text() == before
    assert [x.name for x in tmp_path.iterdir()] == ["c.json"]


def test_parse_layers():
    assert C.parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    with pytest.raises(DupstudioError, match="beyond the model"):
        C.parse_layers("0-30", 30)
