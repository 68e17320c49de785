"""--stream / --no-stream and the automatic choice for calibrate and quant-report: the memory
line before the run, the path taken, the same results."""
import json

import pytest

from dupstudio.core import config as C
from dupstudio.core.model_io import model_shape
from dupstudio.core.testing import tiny_text

CAL = ["--seqs", "6", "--seq-len", "32", "--steps", "3", "--batch", "4", "--method", "adam"]


@pytest.fixture(scope="module")
def files(tiny_model_dir, tiny_loaded, tmp_path_factory):
    d = tmp_path_factory.mktemp("streamcli")
    cfg = C.new_config(model_shape(tiny_loaded.config), source=str(tiny_model_dir), replicas=2,
                       layers=[0, 2])
    C.save(cfg, d / "cfg.json")
    (d / "t.txt").write_text(tiny_text(20000))
    return d


def _calibrate(files, out, *flags):
    from dupstudio.cli import main

    return main(["calibrate", str(files / "cfg.json"), "--text", str(files / "t.txt"), *CAL,
                 "--out", str(out), *flags])


def _memory_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("memory estimate: in memory ")]
    assert len(lines) == 1, err
    return lines[0]


def test_calibrate_stream_and_no_stream_write_the_same_configuration(files, tmp_path, capsys):
    saved = {}
    for flag in ("--stream", "--no-stream"):
        out = tmp_path / f"cal{flag}.json"
        assert _calibrate(files, out, flag) == 0
        line = _memory_line(capsys.readouterr().err)
        assert ", streamed " in line and "; available " in line
        assert line.endswith("-> streamed" if flag == "--stream" else "-> in memory")
        saved[flag] = json.loads(out.read_text())
        assert not (tmp_path / f"cal{flag}.json.partial").exists()
    a, b = saved["--stream"], saved["--no-stream"]
    assert a["provenance"]["calibration"]["streamed"] is True
    assert "streamed" not in b["provenance"]["calibration"]
    assert a["tensors"]["sha256"] == b["tensors"]["sha256"]  # the same tensors, bit for bit
    for x, y in zip(a["blocks"], b["blocks"]):
        assert x["gains"] == y["gains"]
        assert x["calibration"]["loss_before"] == y["calibration"]["loss_before"]
        assert x["calibration"]["loss_after"] == y["calibration"]["loss_after"]


def test_calibrate_picks_streaming_when_the_in_memory_path_does_not_fit(files, tiny_model_dir,
                                                                         tmp_path, capsys,
                                                                         monkeypatch):
    from dupstudio.core import streaming as S
    from dupstudio.core.calibrate import settings_from

    cfg = C.load(files / "cfg.json")
    s = settings_from("fast", seqs=6, seq_len=32, steps=3, batch=4, method="adam")
    config_json = json.loads((tiny_model_dir / "config.json").read_text())
    est = S.estimate_calibration_memory(config_json, cfg, 6, 32, s, checkpoint=True)
    # just below the in-memory estimate: streamed; just at it: in memory
    for avail, path in ((est["in_memory_bytes"] - 1, "streamed"), (est["in_memory_bytes"], "in memory")):
        monkeypatch.setattr(S, "available_memory", lambda a=avail: a)
        out = tmp_path / f"auto-{path[:2]}.json"
        assert _calibrate(files, out) == 0
        line = _memory_line(capsys.readouterr().err)
        assert line == S.memory_line(est["in_memory_bytes"], est["streamed_bytes"], avail,
                                     path == "streamed")
        prov = json.loads(out.read_text())["provenance"]["calibration"]
        assert prov.get("streamed", False) is (path == "streamed")
    # an explicit flag wins over the estimate
    monkeypatch.setattr(S, "available_memory", lambda: 1)
    assert _calibrate(files, tmp_path / "forced.json", "--no-stream") == 0
    assert _memory_line(capsys.readouterr().err).endswith("-> in memory")


def test_quant_report_stream_and_no_stream_agree(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from dupstudio.cli import main
    from dupstudio.core import streaming as S

    rep = {}
    for flag in ("--stream", "--no-stream"):
        out = tmp_path / f"r{flag}.json"
        assert main(["quant-report", str(tiny_model_dir), "--json", str(out), flag]) == 0
        line = _memory_line(capsys.readouterr().err)
        assert line.endswith("-> streamed" if flag == "--stream" else "-> in memory")
        rep[flag] = json.loads(out.read_text())
    a, b = rep["--stream"], rep["--no-stream"]
    assert a["settings"]["streamed"] is True and b["settings"]["streamed"] is False
    assert len(a["matrices"]) == 21
    for x, y in zip(a["matrices"], b["matrices"]):
        for key in ("block", "matrix", "mse", "rel_fro", "sqnr_db", "max_abs", "clipped_frac"):
            assert x[key] == y[key], key
    assert a["total"]["mse"] == b["total"]["mse"]
    # automatic: streamed when the whole model would not fit
    est = S.estimate_report_memory(json.loads((tiny_model_dir / "config.json").read_text()))
    assert est["streamed_bytes"] < est["in_memory_bytes"]
    monkeypatch.setattr(S, "available_memory", lambda: est["in_memory_bytes"] - 1)
    assert main(["quant-report", str(tiny_model_dir), "--json", str(tmp_path / "auto.json")]) == 0
    assert _memory_line(capsys.readouterr().err).endswith("-> streamed")
    assert json.loads((tmp_path / "auto.json").read_text())["settings"]["streamed"] is True


def test_calibrate_pipeline_gptq_codes_then_end_to_end(files, tmp_path, capsys):
    """--codes gptq --e2e-steps N runs both stages and records them; the end-to-end stage draws
    on the whole text (--e2e-seqs all), more than the block-wise pass's --seqs."""
    out = tmp_path / "cal.json"
    assert _calibrate(files, out, "--no-stream", "--codes", "gptq", "--e2e-steps", "2",
                      "--e2e-seqs", "all") == 0
    cal = json.loads(out.read_text())["provenance"]["calibration"]
    assert cal["settings"]["codes"] == "gptq" and cal["settings"]["e2e_steps"] == 2
    assert cal["end_to_end"]["steps"] == 2
    assert cal["tokens"] == 6 * 32  # the block-wise pass: --seqs windows
    assert cal["end_to_end"]["tokens"] > 6 * 32  # the whole text's windows
    # streaming cannot hold the end-to-end stage: it is skipped with a message, not silently
    out2 = tmp_path / "cal2.json"
    assert _calibrate(files, out2, "--stream", "--e2e-steps", "2") == 0
    assert "end-to-end stage needs the whole model in memory" in capsys.readouterr().err
    assert "skipped" in json.loads(out2.read_text())["provenance"]["calibration"]["end_to_end"]


@pytest.mark.parametrize("flags,msg", [(["--e2e-seqs", "0"], "at least 1"),
                                       (["--e2e-seqs", "x"], "whole number"),
                                       (["--codes", "gptq", "--gptq-damp", "-1"], "out of range")])
def test_calibrate_refuses_bad_pipeline_values(files, tmp_path, capsys, flags, msg):
    from dupstudio.cli import main

    rc = main(["calibrate", str(files / "cfg.json"), "--text", str(files / "t.txt"), *CAL,
               "--out", str(tmp_path / "x.json"), *flags])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
