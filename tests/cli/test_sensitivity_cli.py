"""``dupstudio sensitivity`` on the tiny model with fast settings."""
import pandas as pd
import pytest

from dupstudio.cli import main
from dupstudio.core.testing import tiny_text

FAST = ["--seqs", "4", "--seq-len", "32", "--steps", "2", "--batch", "4", "--kl-windows", "2"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("sens") / "text.txt"
    p.write_text(tiny_text(), encoding="utf-8")
    return p


def test_sensitivity_writes_csv_and_png(tmp_path, tiny_model_dir, text, capsys):
    out = tmp_path / "sens"
    code = main(["sensitivity", str(tiny_model_dir), "--text-cal", str(text), "--blocks", "2,0",
                 "--mode", "parallel", "--out", str(out), *FAST])
    printed, err = capsys.readouterr()
    assert code == 0, err
    df = pd.read_csv(out / "sensitivity.csv")
    assert list(df["block"]) == [2, 0]
    assert list(df.columns) == ["block", "kl_quantized", "kl_k1", "kl_k2", "kl_gain", "bits_per_weight",
                                "bits_per_weight_k2", "seconds"]
    assert (df["kl_quantized"] > 0).all() and df["kl_gain"].notna().all()
    data = (out / "sensitivity.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert "kl_quantized" in printed and "kl_gain" in printed
    assert "dupstudio:" in err and "second-replica gains" in err  # progress and summary on stderr


def test_sensitivity_no_replica_all_blocks(tmp_path, tiny_model_dir, text, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", str(tiny_model_dir), "--text-cal", str(text), "--no-replica",
                 "--bits", "3", "--group-size", "32", "--out", str(out), *FAST]) == 0
    df = pd.read_csv(out / "sensitivity.csv")
    assert list(df["block"]) == [0, 1, 2] and "kl_gain" not in df.columns
    assert (out / "sensitivity.png").stat().st_size > 1000


@pytest.mark.parametrize("blocks, msg", [("0,x", "'x' is not a block number"),
                                         ("0,7", "7 is not a block of this model (0-2)"),
                                         ("4-2", "'4-2' is not a block number")])
def test_sensitivity_bad_blocks(tmp_path, tiny_model_dir, text, capsys, blocks, msg):
    code = main(["sensitivity", str(tiny_model_dir), "--text-cal", str(text), "--blocks", blocks,
                 "--out", str(tmp_path / "o"), *FAST])
    _, err = capsys.readouterr()
    assert code == 2 and "dupstudio: error: blocks:" in err and msg in err, err
    assert not (tmp_path / "o").exists()


def test_sensitivity_bad_group_size(tmp_path, tiny_model_dir, text, capsys):
    code = main(["sensitivity", str(tiny_model_dir), "--text-cal", str(text), "--group-size", "48",
                 "--out", str(tmp_path / "o"), *FAST])
    _, err = capsys.readouterr()
    assert code == 2 and "group size 48" in err, err
