"""Machine micro-benchmark: tiny sizes, structure and sanity only (never timing)."""
import json
import math

import pytest

from dupstudio.core import machine_profile as mp
from dupstudio.core.jobs import Cancelled, CancelToken
from dupstudio.core.roofline import PROFILE_FIGURES, HardwareProfile, get_profile, predict, validate_profile

TINY_BLOCK = {"hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "num_kv_heads": 1, "head_dim": 64}
TINY_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_blocks": 2, "num_heads": 2, "num_kv_heads": 1,
              "head_dim": 64, "vocab_size": 64, "tied_embeddings": True}


def test_bench_functions_tiny():
    bw = mp.bench_bandwidth(1 << 20, repeats=1)
    assert bw["best_gbs"] > 0 and bw["best_gbs"] == max(bw["read_sum_gbs"], bw["copy_gbs"], bw["gemv_gbs"])
    mm = mp.bench_matmul(32, repeats=1)
    assert mm["tflops"] > 0 and mm["n"] == 32
    q = mp.bench_quantized_matmul(2, k=128, n=64, m=1, repeats=1)
    assert q["tflops"] > 0 and q["weight_gbs"] > 0 and q["bits"] == 2
    d = mp.bench_dispatch((1, 4), repeats=2)
    assert d["per_op_us"] >= 0 and d["per_eval_us"] >= 0 and len(d["points_us"]) == 2


def test_bench_block_tiny():
    r = mp.bench_block(TINY_BLOCK, bits=4, group_size=64, context=3, trials=1, flush_bytes=1 << 20,
                       bandwidth_gbs=1.0, quantized_tflops=1e-3)
    for k in ("p_cold_s", "p_second_s", "p_hot_s", "floor_s", "roofline_s", "weight_bytes", "best_s", "ops_per_pass"):
        assert k in r
    assert r["weight_bytes"] > 0 and r["floor_s"] >= 0 and r["ops_per_pass"] > 0
    assert r["flops_per_pass"] == mp.block_flops(TINY_BLOCK, 3)
    assert math.isnan(r["second_pass_ratio"]) or 0 <= r["second_pass_ratio"] <= 1
    assert isinstance(r["reliable"], bool)
    assert set(r["best_s"]) == {"cold_one", "cold_same", "cold_diff", "hot_one", "hot_same"}


def _tiny_measure(progress=None, cancel=None, **kw):
    return mp.measure(progress, cancel, sizes="tiny", block_shape=TINY_BLOCK, bits=(2, 4))


def test_measure_tiny_has_profile_fields_and_feeds_roofline():
    seen = []
    prof = mp.measure(lambda f, m: seen.append((f, m)), None, sizes="tiny", block_shape=TINY_BLOCK, bits=(2, 4))
    assert isinstance(prof, HardwareProfile)
    d = prof.to_json()
    assert validate_profile("machine", d) == []
    for f in PROFILE_FIGURES:
        assert d[f]["source"]
    assert prof.compute_dtype in ("float32", "float16")
    assert set(prof.quantized_matmul_tflops_by_bits) == {2, 4}
    meta = prof.meta
    for k in ("date", "mlx_version", "backend", "machine", "processor"):
        assert k in meta
    assert len(meta["measurements"]["blocks"]) == 2
    assert seen[-1][0] == 1.0
    r = predict(TINY_SHAPE, None, prof, context=4, prefill_tokens=4)
    assert r.decode["dram"].predicted_ms > 0


def test_measure_can_be_cancelled():
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        _tiny_measure(cancel=tok)


def test_load_or_measure_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path))
    calls = []
    real_measure = mp.measure

    def fake_measure(progress=None, cancel=None, **kw):
        calls.append(1)
        return real_measure(progress, cancel, sizes="tiny", block_shape=TINY_BLOCK, bits=(2, 4))

    monkeypatch.setattr(mp, "measure", fake_measure)
    p1 = mp.load_or_measure()
    path = tmp_path / "machine_profile.json"
    assert path.exists() and len(calls) == 1
    doc = json.loads(path.read_text())
    for k in ("date", "mlx_version", "backend", "machine", "processor"):
        assert k in doc["meta"]
    p2 = mp.load_or_measure()
    assert len(calls) == 1 and p2.bandwidth_gbs == pytest.approx(p1.bandwidth_gbs)
    assert get_profile("machine").bandwidth_gbs == pytest.approx(p1.bandwidth_gbs)
    mp.load_or_measure(refresh=True)
    assert len(calls) == 2
    # a profile from another MLX version is measured again
    doc["meta"]["mlx_version"] = "0.0.0"
    path.write_text(json.dumps(doc))
    mp.load_or_measure()
    assert len(calls) == 3
    # an unreadable cache is ignored
    path.write_text("{not json")
    assert mp.load_cached() is None
