"""The calibration settings carry their own help: every field has a help line, and the command
line's options are built from the fields one to one (same settings as writing them out)."""
import argparse
from dataclasses import asdict

import pytest

from dupstudio.core.calibration.settings import (PRESETS, CalibSettings, setting_help,
                                                 settings_fields, settings_from)


def test_every_field_has_a_help_line_and_its_choices_are_described():
    names = [f.name for f in settings_fields()]
    assert names == list(asdict(CalibSettings()))
    for f in settings_fields():
        assert setting_help(f.name).strip(), f.name
        if "choices" in f.metadata:
            assert f.default in f.metadata["choices"], f.name
            assert set(f.metadata.get("choice_help", {})) <= set(f.metadata["choices"]), f.name


def _parse(*argv):
    from dupstudio.commands import calibrate as cmd

    p = argparse.ArgumentParser()
    cmd.register(p.add_subparsers())
    return p.parse_args(["calibrate", "cfg.json", "--out", "x.json", *argv])


@pytest.mark.parametrize("argv,expect", [
    ((), {}),
    (("--preset", "full"), {}),
    (("--no-incremental", "--act-order", "--gains"), dict(incremental=False, gptq_act_order=True, gains=True)),
    (("--method", "ap", "--ap-lr", "0.002", "--steps", "7", "--seq-len", "64"),
     dict(method="ap", ap_lr=0.002, steps=7, seq_len=64)),
    (("--codes", "gptq", "--gptq-damp", "0.05", "--seed", "3"), dict(codes="gptq", gptq_damp=0.05, seed=3)),
])
def test_options_are_built_from_the_fields(argv, expect):
    a = _parse(*argv)
    over = {f.name: getattr(a, f.name) for f in settings_fields()}
    assert {k: v for k, v in over.items() if v is not None} == expect  # unset: the preset's
    s = settings_from(a.preset, **over)
    assert asdict(s) == asdict(settings_from(a.preset, **expect))
    if not expect:
        assert s == PRESETS[a.preset]


def test_help_reads_each_fields_help_and_the_presets_defaults(monkeypatch):
    from dupstudio.commands import calibrate as cmd

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no word broken at a hyphen

    p = argparse.ArgumentParser()
    cmd.register(p.add_subparsers())
    sub = p._subparsers._group_actions[0].choices["calibrate"]
    text = " ".join(sub.format_help().split())
    for f in settings_fields():
        if "option_help" not in f.metadata:
            assert " ".join(setting_help(f.name).split()) in text, f.name
    assert "--e2e-seqs" in text and "'all'" in text and "--no-incremental" in text
    assert f"(default: the preset's, {PRESETS['fast'].steps} fast, {PRESETS['full'].steps} full)" in text
