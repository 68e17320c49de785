"""Roofline model: hand counts on the tiny shape, replica accounting, the floor term, profiles."""
import json
import math

import pytest

from dupstudio.core.jobs import DupstudioError
from dupstudio.core.roofline import (
    ASSUMPTIONS,
    PROFILE_FIGURES,
    BlockPlan,
    EmbedPlan,
    get_profile,
    load_profiles,
    load_profiles_doc,
    predict,
    preset_shape,
    profiles_path,
    roofline_curve,
    shape_from_hf_config,
    uniform_plan,
    validate_profiles_doc,
)

# The tiny test model's shape (dupstudio.core.testing.tiny_config with vocab 384).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_blocks": 3, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 64, "vocab_size": 384, "tied_embeddings": True}
CONTEXT = 10


@pytest.fixture(scope="module")
def m1pro():
    return get_profile("apple-m1-pro")


# ----------------------------------------------------------------------------- hand count
# Linear parameters of one block:
#   q_proj 256x256 = 65,536   k_proj 128x256 = 32,768   v_proj 128x256 = 32,768   o_proj 256x256 = 65,536
#   gate 512x256 = 131,072    up 512x256 = 131,072      down 256x512 = 131,072
LINEAR = 65_536 + 32_768 + 32_768 + 65_536 + 131_072 + 131_072 + 131_072
assert LINEAR == 589_824
# 2-bit g64: codes 589,824 x 2 / 8 = 147,456 B; 9,216 groups x (fp16 scale + fp16 bias) = 36,864 B
CODES_2B = 147_456
SCALES_G64 = 36_864
NORMS = 2 * 256 * 2  # two RMSNorm weight vectors, fp16 = 1,024 B
WEIGHTS_2B = CODES_2B + SCALES_G64 + NORMS  # 185,344 B
# KV cache, fp16: one position of K and V = 2 x 2 kv heads x 64 x 2 B = 512 B;
# decode at context 10 reads 11 positions (the new one included) and writes 1
KV_READ = 11 * 512  # 5,632
KV_WRITE = 512
EMBED_ROW = 256 * 2  # fp16 embedding row: 512 B
FINAL_NORM = 256 * 2  # 512 B
HEAD_TIED = 384 * 256 * 2  # tied head reads the whole fp16 embedding matrix: 196,608 B
# FLOPs of one block pass at context 10: linears 2 x 589,824 = 1,179,648;
# attention scores + values 4 x 4 heads x 64 x 11 keys = 11,264
BLOCK_FLOPS = 2 * LINEAR + 4 * 4 * 64 * 11
assert BLOCK_FLOPS == 1_190_912
HEAD_FLOPS = 2 * 384 * 256  # 196,608


def test_decode_hand_count_2bit(m1pro):
    r = predict(TINY, uniform_plan(TINY, bits=2, group_size=64), m1pro, context=CONTEXT, prefill_tokens=0)
    total_bytes = 3 * (WEIGHTS_2B + KV_READ + KV_WRITE) + EMBED_ROW + FINAL_NORM + HEAD_TIED
    assert total_bytes == 772_096
    total_flops = 3 * BLOCK_FLOPS + HEAD_FLOPS
    assert total_flops == 3_769_344
    for a in ASSUMPTIONS:  # K = 1: the assumptions agree
        e = r.decode[a]
        assert e.bytes == total_bytes
        assert e.flops == total_flops
        assert e.passes == 3
    # the time terms, written out
    e = r.decode["dram"]
    q_bytes = 3 * (CODES_2B + SCALES_G64)  # 552,960 B at the quantized fraction 0.70
    f_bytes = total_bytes - q_bytes  # norms, KV, embedding row, head at the fp16 fraction 0.86
    assert e.quantized_bytes == q_bytes
    bw_s = q_bytes / (0.70 * 200e9) + f_bytes / (0.86 * 200e9)
    comp_s = 3 * 2 * LINEAR / (m1pro.quantized_matmul_tflops * 1e12) + \
        (3 * 4 * 4 * 64 * 11 + HEAD_FLOPS) / (5.2e12)
    assert e.bandwidth_ms == pytest.approx(bw_s * 1e3)
    assert e.compute_ms == pytest.approx(comp_s * 1e3)
    assert e.overhead_ms == pytest.approx(3 * 80e-3)
    assert e.predicted_ms == pytest.approx(max(bw_s, comp_s) * 1e3 + 3 * 0.080)
    assert e.predicted_no_floor_ms == pytest.approx(max(bw_s, comp_s) * 1e3)
    # per block
    b = r.blocks[0]
    assert (b.linear_params, b.code_bytes, b.scale_bias_bytes, b.norm_bytes) == (LINEAR, CODES_2B, SCALES_G64, NORMS)
    assert b.weight_bytes == WEIGHTS_2B and b.replica_param_bytes == 0
    assert b.flops == BLOCK_FLOPS and b.passes == 1
    assert b.fits_in_cache  # 185 kB vs 24 MB SLC
    assert r.bits_per_weight == pytest.approx(2.5)


def test_decode_hand_count_fp16_untied_head_and_quantized_embedding(m1pro):
    shape = dict(TINY, tied_embeddings=False)
    r = predict(shape, None, m1pro, embed=EmbedPlan(bits=4, group_size=64), head=EmbedPlan(bits=8, group_size=64),
                context=CONTEXT, prefill_tokens=0)
    block = 2 * LINEAR + NORMS + KV_READ + KV_WRITE  # fp16 weights: 1,179,648 + 1,024 + 6,144
    emb_row = 256 * 4 // 8 + (256 // 64) * 4  # 4-bit row: 128 B codes + 16 B scales/biases
    head = 384 * 256 * 8 // 8 + (384 * 256 // 64) * 4  # 8-bit head: 98,304 + 6,144
    assert r.decode["dram"].bytes == 3 * block + emb_row + FINAL_NORM + head
    assert r.decode["dram"].flops == 3 * BLOCK_FLOPS + HEAD_FLOPS
    assert r.storage_bytes["embedding"] == 384 * 256 // 2 + (384 * 256 // 64) * 4
    assert r.storage_bytes["head"] == head


def test_prefill_hand_count(m1pro):
    P = 8
    r = predict(TINY, uniform_plan(TINY, bits=2), m1pro, context=0, prefill_tokens=P)
    e = r.prefill["dram"]
    # weights once (one chunk); KV written for 8 positions and read up to the chunk end (8); P rows of the
    # embedding; the head once, for the last position
    assert e.bytes == 3 * (WEIGHTS_2B + 8 * 512 + 8 * 512) + P * EMBED_ROW + FINAL_NORM + HEAD_TIED
    # linears x P tokens; causal attention over 1 + 2 + ... + 8 = 36 keys
    assert e.flops == 3 * (2 * LINEAR * P + 4 * 4 * 64 * 36) + HEAD_FLOPS
    assert e.passes == 3 and e.tokens == P
    # chunked prefill: 3 chunks of 3 -> weights read 3 times, 3 x 3 passes
    r3 = predict(TINY, uniform_plan(TINY, bits=2), m1pro, context=0, prefill_tokens=P, prefill_chunk=3)
    assert r3.prefill["dram"].passes == 9
    kv_read = (3 + 6 + 8) * 512
    assert r3.prefill["dram"].bytes == 3 * (3 * WEIGHTS_2B + 8 * 512 + kv_read) + P * EMBED_ROW + FINAL_NORM \
        + HEAD_TIED


# ----------------------------------------------------------------------------- replicas
def test_k2_serial_doubles_flops_passes_and_dram_weight_bytes(m1pro):
    k1 = predict(TINY, uniform_plan(TINY, bits=2), m1pro, context=CONTEXT, prefill_tokens=0)
    k2 = predict(TINY, uniform_plan(TINY, bits=2, replicas=2, mode="serial"), m1pro, context=CONTEXT,
                 prefill_tokens=0, second_pass_ratio=0.25)
    for b1, b2 in zip(k1.blocks, k2.blocks):
        assert b2.flops == 2 * b1.flops
        assert b2.passes == 2 * b1.passes == 2
        assert b2.replica_param_bytes == SCALES_G64  # default: a full set of scales + biases
        # each replica pass has its own KV cache
        assert (b2.kv_read_bytes, b2.kv_write_bytes) == (2 * KV_READ, 2 * KV_WRITE)
        kv2 = b2.kv_read_bytes + b2.kv_write_bytes
        kv1 = b1.kv_read_bytes + b1.kv_write_bytes
        # dram: twice the block's weight bytes (codes, norms re-read; the replica's own scales)
        assert b2.dram_bytes["dram"] - kv2 == 2 * (b1.dram_bytes["dram"] - kv1) == 2 * WEIGHTS_2B
        # cache: only the replica parameters on top of K = 1
        assert b2.dram_bytes["cache"] - kv2 == (b1.dram_bytes["cache"] - kv1) + SCALES_G64
        # measured r = 0.25: a quarter of the shared codes + norms again
        assert b2.dram_bytes["measured"] - kv2 == WEIGHTS_2B + SCALES_G64 + 0.25 * (CODES_2B + NORMS)
    assert k2.decode["dram"].flops == 2 * 3 * BLOCK_FLOPS + HEAD_FLOPS
    assert k2.decode["dram"].passes == 6
    extra_kv = 3 * (KV_READ + KV_WRITE)
    assert k2.decode["dram"].bytes - k1.decode["dram"].bytes == 3 * WEIGHTS_2B + extra_kv
    assert k2.decode["cache"].bytes - k1.decode["cache"].bytes == 3 * SCALES_G64 + extra_kv
    assert k2.components["replica_params"] == 3 * SCALES_G64
    assert k2.bits_per_weight == pytest.approx(3.0)
    # the memory budget of replication: K = 2 : K = 1 deploy memory of the block linears <= 1.25x
    assert k2.storage_bytes["block_linears"] / k1.storage_bytes["block_linears"] == pytest.approx(1.2)


def test_replica_param_values_and_parallel_mode(m1pro):
    plans = [BlockPlan(2, 64), BlockPlan(2, 64, replicas=3, mode="parallel", replica_param_values=1000),
             BlockPlan(4, 32)]
    r = predict(TINY, plans, m1pro, context=CONTEXT, prefill_tokens=0)
    b = r.blocks[1]
    assert b.replica_param_bytes == 2 * 2 * 1000  # 2 extra replicas x 1,000 fp16 values
    assert b.passes == 3 and b.flops == 3 * BLOCK_FLOPS
    assert r.decode["cache"].passes == 5
    assert r.blocks[2].scale_bias_bytes == (LINEAR // 32) * 4


def test_floor_term_adds_passes_times_floor(m1pro):
    for K in (1, 2):
        r = predict(TINY, uniform_plan(TINY, bits=2, replicas=K), m1pro, context=CONTEXT, prefill_tokens=16)
        for ph in ("decode", "prefill"):
            for a in ASSUMPTIONS:
                e = getattr(r, ph)[a]
                assert e.passes == 3 * K
                assert e.predicted_ms - e.predicted_no_floor_ms == pytest.approx(3 * K * m1pro.layer_floor_us / 1e3)
                assert e.predicted_no_floor_ms == pytest.approx(max(e.bandwidth_ms, e.compute_ms))
                # per component: sum of maxima lies between the max of sums and the plain sum
                assert e.predicted_ms - 1e-12 <= e.predicted_per_component_ms <= \
                    e.bandwidth_ms + e.compute_ms + e.overhead_ms + 1e-12


def test_fits_in_cache_and_default_ratio(m1pro):
    s7 = preset_shape("llama-2-7b")
    r = predict(s7, uniform_plan(s7, bits=2, replicas=2), m1pro, prefill_tokens=0)
    b = r.blocks[0]
    # 202,375,168 params x 2.5 bpw = 63 MB (+ replica scales) > 24 MiB
    assert not b.fits_in_cache and b.second_pass_ratio == m1pro.second_pass_ratio_spill
    small = predict(TINY, uniform_plan(TINY, bits=2, replicas=2), m1pro, prefill_tokens=0)
    assert small.fits_in_cache == [True] * 3
    assert small.blocks[0].second_pass_ratio == m1pro.second_pass_ratio_in_cache
    # a function of the working set
    f = predict(TINY, uniform_plan(TINY, bits=2, replicas=2), m1pro, prefill_tokens=0,
                second_pass_ratio=lambda nbytes: 0.1 if nbytes < 1e6 else 0.9)
    assert f.blocks[0].second_pass_ratio == 0.1


def test_per_matrix_bits_hand_count(m1pro):
    """A block with v_proj and down_proj at 6 bits, the rest at 2 (mlx-lm's mixed_2_6 pattern)."""
    plan = BlockPlan(2, 64, matrix_bits={"v_proj": 6, "down_proj": 6})
    r = predict(TINY, plan, m1pro, context=CONTEXT, prefill_tokens=0)
    six = 32_768 + 131_072  # v_proj + down_proj weights
    two = LINEAR - six
    codes = two * 2 // 8 + six * 6 // 8  # 106,496 + 122,880 = 229,376 B
    assert codes == 229_376
    b = r.blocks[0]
    assert (b.code_bytes, b.scale_bias_bytes) == (codes, SCALES_G64)  # same groups, same fp16 pairs
    e = r.decode["dram"]
    assert e.quantized_bytes == 3 * (codes + SCALES_G64)
    assert e.flops == 3 * BLOCK_FLOPS + HEAD_FLOPS
    comp_s = 3 * 2 * two / (m1pro.quantized_tflops(2, "decode") * 1e12) + \
        3 * 2 * six / (m1pro.quantized_tflops(6, "decode") * 1e12) + (3 * 4 * 4 * 64 * 11 + HEAD_FLOPS) / 5.2e12
    assert e.compute_ms == pytest.approx(comp_s * 1e3)
    assert r.bits_per_weight == pytest.approx(8 * (codes + SCALES_G64) / LINEAR)
    # every matrix named at the block's own bits is the plain plan, exactly
    same = BlockPlan(2, 64, matrix_bits={m: 2 for m in ("q_proj", "down_proj")})
    a = predict(TINY, same, m1pro, context=CONTEXT, prefill_tokens=0)
    p = predict(TINY, BlockPlan(2, 64), m1pro, context=CONTEXT, prefill_tokens=0)
    assert a.decode["measured"].predicted_ms == p.decode["measured"].predicted_ms
    assert a.prefill["measured"].predicted_ms == p.prefill["measured"].predicted_ms
    with pytest.raises(DupstudioError, match="unknown linear"):
        predict(TINY, BlockPlan(2, 64, matrix_bits={"wq": 6}), m1pro)
    with pytest.raises(DupstudioError, match="matrix_bits"):
        predict(TINY, BlockPlan(16, 64, matrix_bits={"v_proj": 6}), m1pro)


def test_validation_errors(m1pro):
    smol = preset_shape("smollm2-135m")
    with pytest.raises(DupstudioError, match="does not divide"):
        predict(smol, BlockPlan(2, 128), m1pro)
    with pytest.raises(DupstudioError, match="block plans"):
        predict(TINY, [BlockPlan(2)], m1pro)
    with pytest.raises(DupstudioError, match="bits"):
        predict(TINY, BlockPlan(7), m1pro)
    with pytest.raises(DupstudioError, match="second-pass ratio"):
        predict(TINY, BlockPlan(2, replicas=2), m1pro, second_pass_ratio=1.5)


def test_result_to_dict_is_json(m1pro):
    r = predict(TINY, uniform_plan(TINY, bits=2, replicas=2), m1pro, label="tiny")
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d["decode"]) == set(ASSUMPTIONS)
    for a in ASSUMPTIONS:
        for k in ("bandwidth_ms", "compute_ms", "overhead_ms", "predicted_ms", "predicted_no_floor_ms", "bytes"):
            assert k in d["decode"][a] and k in d["prefill"][a]
    assert d["fits_in_cache"] == [True, True, True]
    assert len(d["blocks"]) == 3 and d["passes"]["decode"] == 6


def test_roofline_curve(m1pro):
    rs = [predict(TINY, uniform_plan(TINY, bits=b), m1pro, label=str(b)) for b in (2, 16)]
    c = roofline_curve(m1pro, rs, n=21)
    assert len(c["intensity"]) == 21
    for path in ("float", "quantized"):
        ys = c["attainable"][path]
        assert all(b >= a for a, b in zip(ys, ys[1:]))
        assert max(ys) == pytest.approx(c["peak_flops"][path])
        ridge = c["ridge_intensity"][path]
        assert ridge == pytest.approx(c["peak_flops"][path] / c["bandwidth_bytes_per_s"][path])
    assert c["peak_flops"]["float"] == pytest.approx(5.2e12)
    assert len(c["points"]) == 2 * 2 * len(ASSUMPTIONS)
    p = c["points"][0]
    assert p["achieved_flops"] <= p["achieved_flops_no_floor"]


# ----------------------------------------------------------------------------- shapes
def test_shape_from_hf_config_and_presets():
    from dupstudio.core.testing import tiny_config

    assert shape_from_hf_config(tiny_config(384)) == TINY
    with pytest.raises(DupstudioError, match="hidden_size"):
        shape_from_hf_config({"num_attention_heads": 4})

    def params(s):
        h, i = s["hidden_size"], s["intermediate_size"]
        q, kv = s["num_heads"] * s["head_dim"], s["num_kv_heads"] * s["head_dim"]
        blocks = s["num_blocks"] * (2 * q * h + 2 * kv * h + 3 * h * i)
        return blocks + s["vocab_size"] * h * (1 if s["tied_embeddings"] else 2)

    assert params(preset_shape("llama-2-7b")) == 6_738_149_376  # "7B" (norms aside)
    assert params(preset_shape("llama-3-8b")) == 8_029_995_008  # "8B"
    assert preset_shape("llama-3-8b")["num_kv_heads"] == 8
    assert not preset_shape("llama-2-7b")["tied_embeddings"]


# ----------------------------------------------------------------------------- profiles file
def test_profiles_file_validates():
    doc = load_profiles_doc()
    assert validate_profiles_doc(doc) == []
    assert doc["default"] == "apple-m1-pro"
    assert get_profile().name == "apple-m1-pro"
    for name, d in doc["profiles"].items():
        for f in PROFILE_FIGURES:
            assert d[f]["source"].strip(), (name, f)
            assert isinstance(d[f]["estimate"], bool), (name, f)
    profiles = load_profiles()
    expected = {"apple-m1", "apple-m1-pro", "apple-m1-max", "apple-m1-ultra", "apple-m2", "apple-m2-pro",
                "apple-m2-max", "apple-m3", "apple-m3-pro", "apple-m3-max", "apple-m4", "apple-m4-pro",
                "apple-m4-max", "nvidia-h100-sxm"}
    assert expected <= set(profiles)
    m1 = profiles["apple-m1-pro"]
    assert (m1.bandwidth_gbs, m1.fp32_tflops, m1.cache_mb) == (200, 5.2, 24)
    assert (m1.achievable_bandwidth_fraction, m1.achievable_bandwidth_fraction_fp16) == (0.70, 0.86)
    assert m1.is_estimate("layer_floor_us") and m1.is_estimate("quantized_matmul_tflops")
    assert not m1.is_estimate("bandwidth_gbs")
    h = profiles["nvidia-h100-sxm"]
    assert (h.bandwidth_gbs, h.cache_mb) == (3350, 50)
    assert profiles_path().name == "hardware_profiles.json"


def test_profile_validation_catches_missing_source(tmp_path, monkeypatch):
    doc = load_profiles_doc()
    doc["profiles"]["apple-m1-pro"]["bandwidth_gbs"]["source"] = ""
    del doc["profiles"]["apple-m1"]["cache_mb"]["estimate"]
    problems = validate_profiles_doc(doc)
    assert any("apple-m1-pro.bandwidth_gbs: no source" in p for p in problems)
    assert any("apple-m1.cache_mb" in p for p in problems)
    bad = tmp_path / "profiles.json"
    bad.write_text(json.dumps(doc))
    monkeypatch.setenv("DUPSTUDIO_HARDWARE_PROFILES", str(bad))
    with pytest.raises(DupstudioError, match="no source"):
        get_profile()


def test_unknown_profile_and_unmeasured_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path))  # no cached machine profile there
    with pytest.raises(DupstudioError, match="unknown hardware profile"):
        get_profile("apple-m9")
    with pytest.raises(DupstudioError, match="no measured profile"):
        get_profile("machine")
    assert math.isfinite(get_profile("apple-m4-max").bandwidth_gbs)
