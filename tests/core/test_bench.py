"""plans_from_config hand counts, and the bench's structure on the tiny model (no timing
assertions: the machine is shared)."""
import json
import math

import pytest

from dupstudio.core import bench as B
from dupstudio.core import config as C
from dupstudio.core.jobs import Cancelled, CancelToken, DupstudioError
from dupstudio.core.model_io import model_shape
from dupstudio.core.replicate import accounting
from dupstudio.core.roofline import ASSUMPTIONS, EmbedPlan, get_profile, plans_from_config, predict

# The tiny model (hidden 256, intermediate 512, 4 heads / 2 KV heads x 64, 3 blocks, vocab 384).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_blocks": 3, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 64, "vocab_size": 384, "tied_embeddings": True}
# (out, in) per matrix: q 256x256, k 128x256, v 128x256, o 256x256, gate 512x256, up 512x256, down 256x512
ROWS = 256 + 128 + 128 + 256 + 512 + 512 + 256  # 2,048 output rows per block
# groups of 64 per block: 256*4 + 128*4 + 128*4 + 256*4 + 512*4 + 512*4 + 256*8 = 9,216
GROUPS_G64 = 1024 + 512 + 512 + 1024 + 2048 + 2048 + 2048
assert GROUPS_G64 == 9_216
GROUP_PARAMS = 2 * GROUPS_G64  # 18,432 fp16 scale + bias values for one replica
CHANNEL_PARAMS = 2 * ROWS  # 4,096: ch_scale + ch_offset per row
ALPHA = 1  # the extra replica's gain


def test_plans_k1_g64_2bit():
    cfg = C.new_config(TINY, bits=2, group_size=64)
    plans, embed = plans_from_config(cfg, TINY)
    assert len(plans) == 3
    for p in plans:
        assert (p.bits, p.group_size, p.replicas, p.mode, p.replica_param_values) == (2, 64, 1, "serial", 0)
    assert embed == EmbedPlan(bits=16, group_size=64)
    assert plans_from_config(cfg, TINY, float_bits=32)[1].bits == 32
    # 2.5 bits per weight, as the accounting says
    r = predict(TINY, plans, "apple-m1-pro", embed=embed, context=4, prefill_tokens=4)
    assert r.bits_per_weight == pytest.approx(2.5)
    assert r.bits_per_weight == pytest.approx(accounting(cfg, TINY)["bits_per_weight"])


def test_plans_k2_serial_group():
    cfg = C.new_config(TINY, bits=2, group_size=64, replicas=2, mode="serial", layers=[0, 2])
    plans, _ = plans_from_config(cfg, TINY)
    assert [p.replicas for p in plans] == [2, 1, 2]
    assert plans[0].mode == "serial"
    assert plans[0].replica_param_values == GROUP_PARAMS + ALPHA == 18_433
    assert plans[1].replica_param_values == 0
    r = predict(TINY, plans, "apple-m1-pro", context=4, prefill_tokens=4)
    assert r.blocks[0].replica_param_bytes == 2 * 18_433
    assert r.blocks[1].replica_param_bytes == 0
    # the roofline's bits per weight equals the configuration's accounting exactly
    assert r.bits_per_weight == pytest.approx(accounting(cfg, TINY)["bits_per_weight"], abs=1e-12)


def test_plans_k2_channel_and_as_built():
    cfg = C.new_config(TINY, bits=2, group_size=64, replicas=2, mode="serial", granularity="channel")
    plans, _ = plans_from_config(cfg, TINY)
    assert all(p.replica_param_values == CHANNEL_PARAMS + ALPHA == 4_097 for p in plans)
    r = predict(TINY, plans, "apple-m1-pro", context=4, prefill_tokens=4)
    assert r.bits_per_weight == pytest.approx(accounting(cfg, TINY)["bits_per_weight"], abs=1e-12)
    # what the deploy builder materialises: a full set of per-group scales and biases per replica
    built, _ = plans_from_config(cfg, TINY, as_built=True)
    assert all(p.replica_param_values == GROUP_PARAMS for p in built)


def test_plans_count_gain_vectors_and_mixed_replicas():
    cfg = C.new_config(TINY, bits=2, group_size=64, replicas=3, mode="parallel")
    cfg.blocks[1].replica[2].granularity = "channel"
    cfg.tensors = {"b1.r1.q_proj.row_gain": None, "b1.r2.col.attn": None, "b1.r2.col.down": None,
                   "b1.r0.q_proj.row_gain": None}  # the primary's gains fold in: not replica params
    plans, _ = plans_from_config(cfg, TINY)
    total = (GROUP_PARAMS + 256 + 1) + (CHANNEL_PARAMS + 256 + 512 + 1)
    assert plans[1].replica_param_values == pytest.approx(total / 2)
    assert plans[1].replicas == 3 and plans[1].mode == "parallel"
    r = predict(TINY, plans, "apple-m1-pro", context=4, prefill_tokens=4)
    assert r.blocks[1].replica_param_bytes == pytest.approx(2 * total)


def test_plans_block_bits_override_and_mismatch():
    cfg = C.new_config(TINY, bits=2, group_size=64)
    cfg.blocks[1].bits, cfg.blocks[1].group_size = 4, 32
    plans, _ = plans_from_config(cfg, TINY)
    assert (plans[1].bits, plans[1].group_size) == (4, 32)
    with pytest.raises(DupstudioError, match="blocks"):
        plans_from_config(cfg, dict(TINY, num_blocks=4))


# ----------------------------------------------------------------------------- measurement
@pytest.fixture(scope="module")
def m1pro():
    return get_profile("m1-pro")


def test_bench_config_structure_on_tiny_model(tiny_loaded, m1pro):
    shape = model_shape(tiny_loaded.config)
    cfg = C.new_config(shape, bits=2, group_size=64, replicas=2, mode="serial")
    seen = []
    out = B.bench_config(tiny_loaded, cfg, prompt_tokens=6, gen_tokens=3, warmup=0, repetitions=1,
                         per_block=True, reference_mlx_lm=True, fp=True, machine_profile=m1pro, profile=m1pro,
                         progress=lambda f, m: seen.append((f, m)))
    json.dumps(out)
    labels = [r["kind"] for r in out["results"]]
    assert labels[0] == "dupstudio" and "mlx-lm" in labels and labels[-1] == "fp"
    assert out["prompt_tokens"] == 6 and out["gen_tokens"] == 3
    for r in out["results"]:
        m = r["measured"]
        assert m["prefill"]["median_ms"] > 0 and m["decode"]["median_ms"] > 0
        assert m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
        assert len(m["prefill"]["samples_ms"]) == 1 and m["prefill"]["spread"] == 0
        assert len(m["per_block"]["blocks_ms"]) == 3
        for ph in ("decode", "prefill"):
            for a in ASSUMPTIONS:
                row = r["comparison"][ph]["assumptions"][a]
                for k in ("with_floor", "no_floor", "per_component", "ratio_with_floor", "ratio_no_floor",
                          "ok_with_floor", "ok_no_floor"):
                    assert k in row
                assert row["with_floor"] >= row["no_floor"] > 0
                assert r["profile"][ph][a]["predicted_ms"] > 0
    assert out["results"][0]["measured"]["passes"] == 6
    assert "default" in out["wrapper_ratio"]
    assert math.isfinite(out["wrapper_ratio"]["default"]["decode"]["median"])
    assert seen and all(f is None or 0 <= f <= 1 for f, _ in seen) and seen[-1][0] == 1.0


def test_references_quantize_like_mlx_lm(tiny_loaded):
    """Decision 14: mlx-lm's conversion quantizes every Linear and the embedding; dupstudio's
    reference configuration does the same, with the same bits and group size."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    shape = model_shape(tiny_loaded.config)
    ref_cfg = B.reference_config(shape, 2, 64)
    assert ref_cfg.embedding.bits == 2 and ref_cfg.embedding.group_size == 64
    assert all(b.replicas == 1 for b in ref_cfg.blocks)
    mlm = B.build_mlx_lm_reference(tiny_loaded, 2, 64)
    assert isinstance(mlm.model.embed_tokens, nn.QuantizedEmbedding)
    assert all(isinstance(layer.mlp.down_proj, nn.QuantizedLinear) for layer in mlm.model.layers)
    dup = B.build_deploy(tiny_loaded, ref_cfg)
    assert isinstance(dup.embed_tokens, nn.QuantizedEmbedding)
    assert dup.embed_tokens.bits == mlm.model.embed_tokens.bits == 2
    # the same quantization (minmax = mx.quantize), up to dupstudio's fp16 rounding of scales
    x = mx.array([[1, 5, 9, 13]])
    a, b = np.array(dup(x)), np.array(mlm(x))
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) >= 0.75
    # compute-dtype scales hold the same values (the quantized embedding then dequantizes in float32
    # rather than float16 arithmetic: close, not bit-identical)
    dup32 = B.build_deploy(tiny_loaded, ref_cfg, scale_dtype="compute")
    assert dup32.blocks[0].replicas[0].mlp.up_proj.scales.dtype == tiny_loaded.dtype
    assert np.array_equal(np.array(dup32.blocks[0].replicas[0].mlp.up_proj.scales),
                          np.array(dup.blocks[0].replicas[0].mlp.up_proj.scales.astype(mx.float32)))
    assert np.allclose(np.array(dup32(x)), a, atol=5e-3, rtol=5e-3)


def test_time_models_cancel_and_errors(tiny_loaded):
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        B.time_models([("fp", "fp", tiny_loaded.model)], 4, 2, tokenizer=tiny_loaded.tokenizer, cancel=tok)
    with pytest.raises(DupstudioError):
        B.time_models([("fp", "fp", tiny_loaded.model)], 4, 0)
    with pytest.raises(DupstudioError):
        B.prompt_ids(None, 0)
    assert len(B.prompt_ids(tiny_loaded.tokenizer, 50)) == 50
    assert B.prompt_ids(None, 5, 7) == B.prompt_ids(None, 5, 7)


def test_predict_for_uses_compute_dtype(m1pro):
    cfg = C.new_config(TINY, bits=2, group_size=64)
    r = B.predict_for(TINY, m1pro, cfg, prompt_tokens=8, gen_tokens=4)
    assert r.embed["bits"] == 16 and r.context == B.decode_context(8, 4) == 9
    fp = B.predict_for(TINY, m1pro, fp=True, prompt_tokens=8, gen_tokens=4)
    assert fp.plans[0]["bits"] == 16
    assert fp.decode["dram"].bytes > r.decode["dram"].bytes


# ----------------------------------------------------------------------------- profile figures per phase
def test_phase_figures_drive_the_prediction(m1pro):
    """A profile's per-phase quantized throughput and prefill float bandwidth fraction are the ones
    the roofline divides by (the CPU's measured profile carries them)."""
    import dataclasses

    from dupstudio.core.roofline import BlockPlan, HardwareProfile, uniform_plan

    prof = dataclasses.replace(m1pro, quantized_matmul_tflops_by_phase={"decode": {2: 1e-3}, "prefill": {2: 4e-3}},
                               prefill_float_bandwidth_fraction=0.25, layer_floor_us=0.0)
    r = predict(TINY, [BlockPlan(bits=2, group_size=64)] * 3, prof, context=0, prefill_tokens=4,
                embed=EmbedPlan(16))
    lin = 2 * 589_824 * 3  # linear FLOPs per token, 3 blocks
    att_dec = 3 * 4 * 4 * 64 * 1
    head = 2 * 384 * 256
    expect_dec = lin / 1e9 + (att_dec + head) / (prof.float_tflops * 1e12)
    assert r.decode["cache"].compute_ms == pytest.approx(expect_dec * 1e3, rel=1e-9)
    att_pre = 3 * 4 * 4 * 64 * (4 * 5 // 2)
    expect_pre = 4 * lin / 4e9 + (att_pre + head) / (prof.float_tflops * 1e12)
    assert r.prefill["cache"].compute_ms == pytest.approx(expect_pre * 1e3, rel=1e-9)
    # float weights in prefill stream at the prefill fraction
    fp = predict(TINY, uniform_plan(TINY, 16), prof, context=0, prefill_tokens=4)
    fp_base = predict(TINY, uniform_plan(TINY, 16), dataclasses.replace(prof, prefill_float_bandwidth_fraction=None),
                      context=0, prefill_tokens=4)
    assert fp.decode["cache"].bandwidth_ms == pytest.approx(fp_base.decode["cache"].bandwidth_ms)
    # the blocks' float bytes stream at the prefill fraction; the head of the last position (a GEMV)
    # and the embedding rows keep the decode fraction
    e = fp.prefill["cache"]
    head_emb = 384 * 256 * 2 + 256 * 2 + 4 * 256 * 2  # tied head, final norm, 4 embedding rows
    block_bytes = e.bytes - head_emb
    extra_ms = block_bytes * (1 / 0.25 - 1 / m1pro.achievable_bandwidth_fraction_fp16) / (m1pro.bandwidth_gbs * 1e9) * 1e3
    assert e.bandwidth_ms == pytest.approx(fp_base.prefill["cache"].bandwidth_ms + extra_ms, rel=1e-9)
    # float prefill matmuls at the profile's prefill rate where it has one
    fast = dataclasses.replace(prof, float_matmul_tflops_by_phase={"prefill": 2 * prof.float_tflops})
    f2 = predict(TINY, uniform_plan(TINY, 16), fast, context=0, prefill_tokens=4)
    assert f2.prefill["cache"].compute_ms < fp.prefill["cache"].compute_ms
    assert f2.decode["cache"].compute_ms == pytest.approx(fp.decode["cache"].compute_ms)
    # per-row term: (rows - 1) x layer_row_us per layer pass in prefill, nothing at decode
    rowp = dataclasses.replace(prof, layer_row_us=10.0)
    f3 = predict(TINY, uniform_plan(TINY, 16), rowp, context=0, prefill_tokens=4)
    assert f3.prefill["cache"].overhead_ms == pytest.approx(fp.prefill["cache"].overhead_ms + 3 * 3 * 10e-3)
    assert f3.decode["cache"].overhead_ms == pytest.approx(fp.decode["cache"].overhead_ms)
    # JSON round trip keeps them
    back = HardwareProfile.from_json("x", prof.to_json())
    assert back.quantized_tflops(2, "decode") == 1e-3 and back.quantized_tflops(2, "prefill") == 4e-3
    assert back.prefill_float_bandwidth_fraction == 0.25
    back2 = HardwareProfile.from_json("x", dataclasses.replace(
        prof, layer_row_us=7.5, float_matmul_tflops_by_phase={"prefill": 0.5}).to_json())
    assert back2.layer_row_us == 7.5 and back2.float_tflops_for("prefill") == 0.5
    assert back.quantized_tflops(4, "decode") == m1pro.quantized_matmul_tflops


def test_bench_path_and_measured_profile_figures(tmp_path, monkeypatch):
    from dupstudio.core import machine_profile as MP

    blk = {"hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "num_kv_heads": 1, "head_dim": 64}
    q = MP.bench_path(2, 1, blk, min_bytes=0, max_blocks=2, min_blocks=2, repeats=1)
    assert q["blocks"] == 2 and q["tflops"] > 0 and q["weight_gbs"] > 0 and q["m"] == 1
    f = MP.bench_path(None, 4, blk, min_bytes=0, max_blocks=1, repeats=1)
    assert f["bits"] is None and f["tflops"] > 0
    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path))
    prof = MP.measure(sizes="tiny", block_shape=blk, bits=(2, 4))
    assert set(prof.quantized_matmul_tflops_by_phase) == {"decode", "prefill"}
    assert set(prof.quantized_matmul_tflops_by_phase["decode"]) == {2, 4}
    assert 0 < prof.prefill_float_bandwidth_fraction <= 1
    assert 0 < prof.achievable_bandwidth_fraction_fp16 <= 1
    assert prof.layer_row_us >= 0 and prof.layer_floor_us > 0
    assert prof.float_tflops_for("prefill") > 0
    MP.save(prof)
    back = MP.load_cached()
    assert back.quantized_matmul_tflops_by_phase == prof.quantized_matmul_tflops_by_phase
    assert back.prefill_float_bandwidth_fraction == pytest.approx(prof.prefill_float_bandwidth_fraction)
    assert back.float_tflops_for("prefill") == pytest.approx(prof.float_tflops_for("prefill"))
