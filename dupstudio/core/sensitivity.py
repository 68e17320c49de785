"""Per-block sensitivity (issue 9): for each decoder block k, the loss when ONLY block k is
quantized (KL from full precision on calibration text, all other blocks float), and the gain
when block k alone gets a second, calibrated replica. Shown as bars per block (CLI PNG, GUI)."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, ProgressFn, ensure
from dupstudio.core.search import _fast, _kl_windows, _shape, _sub_progress, calibration_kl, hybrid_model


def sensitivity(loaded, cfg_base, cal_tokens: np.ndarray, *, settings=None, kl_windows: int = 8,
                replica_mode: str = "serial", with_replica: bool = True,
                blocks: Optional[list] = None, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None):
    """One row per block: ``kl_quantized`` (only block k quantized per ``cfg_base``, RTN),
    ``kl_k1`` (same, block k calibrated, K=1), ``kl_k2`` (block k with a second calibrated
    replica in ``replica_mode``), ``kl_gain`` = kl_k1 - kl_k2, and the bits/weight each costs.

    Calibration uses full-precision inputs (``incremental=False``): all other blocks are float."""
    import pandas as pd

    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.replicate import accounting

    progress, cancel = ensure(progress, cancel)
    settings = replace(_fast(settings), incremental=False)
    shape = _shape(loaded)
    n = len(cfg_base.blocks)
    todo = list(range(n)) if blocks is None else list(blocks)
    win = _kl_windows(cal_tokens, kl_windows)
    rows = []
    t_all = time.perf_counter()
    for j, k in enumerate(todo):
        cancel.check()
        t0 = time.perf_counter()
        lo, hi = j / len(todo), (j + 1) / len(todo)
        row = {"block": k}
        rtn = cfg_base.copy()
        row["kl_quantized"] = calibration_kl(loaded, hybrid_model(loaded, rtn, [k]), win, cancel)
        row["bits_per_weight"] = accounting(rtn, shape)["blocks"][k]["bits_per_weight"]
        if with_replica:
            sp = _sub_progress(progress, lo, lo + (hi - lo) / 2, f"block {k} K=1: ")
            c1 = calibrate(loaded, rtn, cal_tokens, settings, blocks=[k], progress=sp, cancel=cancel)
            row["kl_k1"] = calibration_kl(loaded, hybrid_model(loaded, c1, [k]), win, cancel)
            c2 = cfg_base.copy()
            c2.blocks[k].set_replicas(2, replica_mode)
            sp = _sub_progress(progress, lo + (hi - lo) / 2, hi, f"block {k} K=2: ")
            c2 = calibrate(loaded, c2, cal_tokens, settings, blocks=[k], progress=sp, cancel=cancel)
            row["kl_k2"] = calibration_kl(loaded, hybrid_model(loaded, c2, [k]), win, cancel)
            row["kl_gain"] = row["kl_k1"] - row["kl_k2"]
            row["bits_per_weight_k2"] = accounting(c2, shape)["blocks"][k]["bits_per_weight"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        progress(hi, f"block {k}: KL {row['kl_quantized']:.4g}"
                 + (f", second replica gains {row['kl_gain']:.4g}" if with_replica else ""))
    df = pd.DataFrame(rows)
    df.attrs["seconds"] = time.perf_counter() - t_all
    df.attrs["settings"] = asdict(settings)
    return df
