"""Job bodies: everything here runs on the MLX worker thread (see :mod:`dupstudio.gui.worker`).

Each ``*_job(...)`` returns a callable ``fn(progress, cancel[, emit])`` for
:meth:`JobRunner.submit`. Results are plain Python / numpy values (plus, for the model loader, the
opaque ``LoadedModel`` handle, which the GUI thread only passes back into later jobs).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np



class BuildCache:
    """The last model built from a configuration (keyed by configuration revision and mode).
    Touched on the worker thread only. One entry: the default model's float32 copy is large."""

    def __init__(self) -> None:
        self._key = None
        self._model = None

    def get(self, loaded, cfg, revision: int, mode: str, progress=None, cancel=None):
        from dupstudio.core.replicate import build

        key = (id(loaded), revision, mode)
        if self._key == key and self._model is not None:
            return self._model
        self._key = self._model = None
        model = build(loaded, cfg, mode, progress=progress, cancel=cancel)
        self._key, self._model = key, model
        return model

    def clear(self) -> None:
        self._key = self._model = None


# --------------------------------------------------------------------------- model
def load_model_job(source: Optional[str]):
    def job(progress, cancel):
        from dupstudio.core.model_io import describe, open_model

        loaded = open_model(source, progress=progress, cancel=cancel)
        cancel.check()
        progress(None, "describing the model")
        return loaded, describe(loaded)

    return job


# --------------------------------------------------------------------------- configuration files
def load_config_job(path: str, shape: dict):
    def job(progress, cancel):
        from dupstudio.core import config as C

        progress(None, f"reading {Path(path).name}")
        return C.load(path, shape)

    return job


def save_config_job(cfg, path: str):
    def job(progress, cancel):
        from dupstudio.core import config as C

        progress(None, f"saving {Path(path).name}")
        C.save(cfg, path)
        return {"path": str(path), "tensors_file": cfg.tensors_file}

    return job


# --------------------------------------------------------------------------- weight error
def _replica_weights(loaded, cfg, k: int, lin: dict):
    from dupstudio.core.replicate import block_tensors

    return block_tensors(loaded, cfg, k, float_weights=lin)


def block_metrics_job(loaded, cfg, blocks: list, revisions: dict):
    """Per block and matrix: relative error and SQNR of every replica's weights (shared codes,
    own scales/biases) against the float weights; replica 0 is the block's primary."""

    def job(progress, cancel):
        import mlx.core as mx

        from dupstudio.core import quant as Q
        from dupstudio.core.metrics import error_metrics
        from dupstudio.core.model_io import block_linears

        lin = block_linears(loaded.model)
        out = {}
        for j, k in enumerate(blocks):
            cancel.check()
            bt = _replica_weights(loaded, cfg, k, lin[k])
            per_matrix = {}
            sse = [0.0] * len(bt.scales)
            wsq = 0.0
            for m in lin[k]:  # the architecture's matrices (phi3: fused ones)
                w = lin[k][m].astype(mx.float32)
                reps = []
                for i in range(len(bt.scales)):
                    wh = Q.dequantize_codes(bt.codes[m], bt.scales[i][m].astype(mx.float32),
                                            bt.biases[i][m].astype(mx.float32), bt.group_size)
                    e = error_metrics(w, wh)
                    reps.append({"rel_fro": e["rel_fro"], "sqnr_db": e["sqnr_db"]})
                    sse[i] += e["_sse"]
                    if i == 0:
                        wsq += e["_wsq"]
                per_matrix[m] = reps
            block = [{"rel_fro": math.sqrt(s / wsq) if wsq > 0 else math.nan,
                      "sqnr_db": 10 * math.log10(wsq / s) if s > 0 else math.inf} for s in sse]
            out[k] = {"revision": revisions[k], "matrices": per_matrix, "replicas": block}
            progress((j + 1) / len(blocks), f"weight error of block {k}")
        return out

    return job


def matrix_detail_job(loaded, cfg, k: int, matrix: str, row: Optional[int], group: Optional[int],
                      bins: int = 160, pick: str = "median"):
    """Histograms of one matrix for the Distributions panel: weights with each replica's grid levels
    (for one group: ``row``/``group``, else the group of median range or, ``pick="largest"``, the one
    holding the largest |w|), weights in the primary's code space, and each replica's error."""

    def job(progress, cancel):
        import mlx.core as mx

        from dupstudio.core import quant as Q
        from dupstudio.core.model_io import block_linears

        progress(None, f"quantizing block {k} {matrix}")
        lin = block_linears(loaded.model)[k]
        bt = _replica_weights(loaded, cfg, k, lin)
        cancel.check()
        w = np.array(lin[matrix].astype(mx.float32))
        codes = np.array(bt.codes[matrix]).astype(np.float32)
        g = bt.group_size
        out_f, in_f = w.shape
        G = in_f // g
        n_levels = 2 ** bt.bits
        scales = [np.array(bt.scales[i][matrix].astype(mx.float32)) for i in range(len(bt.scales))]
        biases = [np.array(bt.biases[i][matrix].astype(mx.float32)) for i in range(len(bt.scales))]
        s0, b0 = scales[0], biases[0]
        wg = w.reshape(out_f, G, g)
        if row is not None and group is not None:
            r, gi = min(max(row, 0), out_f - 1), min(max(group, 0), G - 1)
        elif pick == "largest":
            flat = int(np.argmax(np.abs(w)))
            r, gi = flat // in_f, (flat % in_f) // g
        else:  # a typical group: the median range
            ranges = (wg.max(-1) - wg.min(-1)).ravel()
            flat = int(np.argsort(ranges, kind="stable")[len(ranges) // 2])
            r, gi = flat // G, flat % G
        lim = float(np.percentile(np.abs(w), 99.9)) * 1.5 or 1.0
        edges = np.linspace(-lim, lim, bins + 1)
        whist, _ = np.histogram(w, bins=edges)
        q = np.arange(n_levels, dtype=np.float32)
        levels = [(scales[i][r, gi] * q + biases[i][r, gi]).tolist() for i in range(len(scales))]
        # code space of the primary: (w - b0) / s0 per group
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (wg - b0[..., None]) / s0[..., None]
        z = z[np.isfinite(z)]
        zedges = np.linspace(-1.5, n_levels - 1 + 1.5, min(400, (n_levels + 2) * 16) + 1)
        zhist, _ = np.histogram(z, bins=zedges)
        code_levels = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in range(len(scales)):
                lv = (scales[i][..., None] * q + biases[i][..., None] - b0[..., None]) / s0[..., None]
                lv = lv.reshape(-1, n_levels)
                code_levels.append(np.nanmedian(lv, axis=0).tolist())
        errors, ehists, stats = [], [], []
        for i in range(len(scales)):
            cancel.check()
            wh = (codes.reshape(out_f, G, g) * scales[i][..., None] + biases[i][..., None]).reshape(w.shape)
            e = wh - w
            errors.append(e)
            sse, wsq = float((e.astype(np.float64) ** 2).sum()), float((w.astype(np.float64) ** 2).sum())
            stats.append({"rel_fro": math.sqrt(sse / wsq) if wsq else math.nan,
                          "sqnr_db": 10 * math.log10(wsq / sse) if sse else math.inf,
                          "max_abs": float(np.abs(e).max())})
        elim = float(max(np.percentile(np.abs(e), 99.99) for e in errors)) * 1.05 or 1e-6
        eedges = np.linspace(-elim, elim, bins + 1)
        for e in errors:
            ehists.append(np.histogram(e, bins=eedges)[0])
        return {
            "block": k, "matrix": matrix, "bits": bt.bits, "group_size": g,
            "shape": (out_f, in_f), "row": r, "group": gi, "groups": G,
            "weight_edges": edges, "weight_counts": whist, "levels": levels,
            "weight_outside": int(w.size - whist.sum()),
            "group_weights": wg[r, gi].tolist(),
            "code_edges": zedges, "code_counts": zhist, "code_levels": code_levels,
            "error_edges": eedges, "error_counts": ehists, "stats": stats,
            "scale_bias": [(float(scales[i][r, gi]), float(biases[i][r, gi])) for i in range(len(scales))],
        }

    return job


# --------------------------------------------------------------------------- calibration
def calibration_checkpoint_dir(loaded, cfg, tokens: np.ndarray, settings, blocks: Optional[list] = None) -> Path:
    """A resume folder tied to (model, configuration before calibration, tokens, settings, the
    blocks calibrated: a block's result depends on which earlier blocks were calibrated)."""
    from dupstudio.core import config as C
    from dupstudio.core.model_io import dupstudio_home

    h = hashlib.sha256()
    h.update(str(loaded.path).encode())
    h.update(json.dumps(C.Config.to_dict(cfg), sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(cfg.tensors)).encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(settings.key().encode())
    if blocks is not None:
        h.update(json.dumps(sorted(int(b) for b in blocks)).encode())
    return dupstudio_home() / "gui-calibration" / h.hexdigest()[:20]


_BLOCK_MSG = re.compile(r"^block (\d+): (?:(loss|resumed)|step (\d+)/(\d+))")


def calibrate_job(loaded, cfg, text_path: str, settings, resume: bool = True, stream: bool = False,
                  blocks: Optional[list] = None):
    """Calibrate ``blocks`` (None: every block). ``stream``: one block's float weights in memory
    at a time (the open model's weights are released block by block to lazy reads of its files;
    it stays usable).

    Every finished block is checkpointed (kept for a later resume with ``resume``, else in a
    temporary folder removed at the end) and reported as it finishes: ``emit(("block", k, record,
    i, n, resumed))`` (record: loss before/after, accepted, seconds; i of n blocks done; resumed:
    read back from an earlier run). Progress runs over the chosen blocks only. Cancelled after some blocks finished, the job still returns, with
    ``"cancelled": True`` and the configuration holding just the finished blocks."""

    def job(progress, cancel, emit):
        import shutil
        import tempfile

        import mlx.core as mx

        from dupstudio.core.calibration import checkpoints as CK
        from dupstudio.core.calibration.data import calibration_tokens
        from dupstudio.core.calibrate import calibrate
        from dupstudio.core.evaluate import make_windows, read_text
        from dupstudio.core.jobs import Cancelled
        from dupstudio.core.model_io import dupstudio_home

        progress(None, f"reading {Path(text_path).name}")
        text = read_text(text_path)
        tokens = calibration_tokens(loaded.tokenizer, text, settings.chat)
        windows = make_windows(tokens, settings.seq_len, settings.seqs, what="calibration text")
        cancel.check()
        todo = sorted(set(int(b) for b in blocks)) if blocks else list(range(len(cfg.blocks)))
        if resume:
            ck, temporary = calibration_checkpoint_dir(loaded, cfg, windows, settings, blocks and todo), False
        else:
            tmp_root = dupstudio_home() / "tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            ck, temporary = Path(tempfile.mkdtemp(prefix="gui-calibration-", dir=tmp_root)), True
        reported: list = []

        def report(k: int, resumed: bool = False) -> None:
            if k in reported or k not in todo:
                return
            rec = CK.block_record(ck, k, settings)
            reported.append(k)
            emit(("block", k, rec, len(reported), len(todo), resumed))

        def block_progress(fraction, message) -> None:
            m = _BLOCK_MSG.match(message or "")
            if m is None:
                progress(1.0 if fraction == 1.0 else None, message)
                return
            k = int(m.group(1))
            if m.group(2):  # block k finished (calibrated or resumed)
                report(k, resumed=m.group(2) == "resumed")
                progress(len(reported) / len(todo), message)
            else:
                within = int(m.group(3)) / max(int(m.group(4)), 1)
                progress(min(1.0, (len(reported) + within) / len(todo)), message)

        def on_loss(block, step, loss):
            emit(("loss", int(block), int(step), float(loss)))

        t0 = time.perf_counter()
        try:
            try:
                new = calibrate(loaded, cfg, windows, settings, progress=block_progress, cancel=cancel,
                                on_loss=on_loss, checkpoint_dir=ck, stream=stream,
                                blocks=todo if blocks else None)
                cancelled = False
            except Cancelled:
                new, applied = CK.apply_checkpointed(cfg, ck, settings, todo)
                if not applied:
                    raise
                for k in applied:
                    report(k)
                new.provenance = dict(new.provenance)
                new.provenance["calibration"] = {"settings": _settings_dict(settings), "partial": True,
                                                 "blocks": applied, "seconds": time.perf_counter() - t0}
                cancelled = True
            # tensors may be lazy reads of the checkpoint files: read them here, on this thread
            mx.eval(list(new.tensors.values()))
        finally:
            if temporary:
                shutil.rmtree(ck, ignore_errors=True)
        done = [k for k in todo if new.blocks[k].calibration]
        return {"config": new, "seconds": time.perf_counter() - t0, "cancelled": cancelled,
                "blocks": todo, "finished": done if cancelled else todo,
                "records": [new.blocks[k].calibration for k in (done if cancelled else todo)]}

    return job


def _settings_dict(settings) -> dict:
    from dataclasses import asdict

    return asdict(settings)


# --------------------------------------------------------------------------- evaluation
def evaluate_job(loaded, cfg, revision: Optional[int], cache: BuildCache, text_path: str, windows: int,
                 ctx: int, reference: bool):
    """Perplexity (and KL / top-1 agreement against the float model) of the configuration
    (``cfg`` None: the float model itself)."""

    def job(progress, cancel):
        from dupstudio.core.evaluate import evaluate, make_windows, provenance, read_text, tokenize

        progress(None, f"reading {Path(text_path).name}")
        text = read_text(text_path)
        tokens = tokenize(loaded.tokenizer, text)
        win = make_windows(tokens, ctx, windows, what="evaluation text")
        if cfg is None:
            model, ref = loaded.model, None
        else:
            progress(0.0, "building the configuration (simulate)")
            model = cache.get(loaded, cfg, revision, "simulate", cancel=cancel)
            ref = loaded.model if reference else None
        res = evaluate(model, win, reference=ref, progress=progress, cancel=cancel)
        d = res.to_dict()
        d.pop("window_nll", None)
        d["provenance"] = provenance(text, windows, ctx)
        d["text"] = str(text_path)
        return d

    return job


# --------------------------------------------------------------------------- generation
def generate_job(loaded, cfg, revision: int, cache: BuildCache, prompt: str, max_tokens: int,
                 chat: Optional[bool], temp: float, side_by_side: bool):
    """Stream the configured model's (deploy mode) continuation, then, with ``side_by_side``, the
    float model's. Emits ("start", which), ("chunk", which, text, tokens, tokens_per_s) and
    ("end", which, finish_reason, tokens, tokens_per_s)."""

    def job(progress, cancel, emit):
        from dupstudio.core.generate import generate_stream

        progress(None, "building the configuration (deploy)")
        model = cache.get(loaded, cfg, revision, "deploy", cancel=cancel)
        runs = [("config", model)] + ([("fp", loaded.model)] if side_by_side else [])
        stats = {}
        for which, m in runs:
            cancel.check()
            emit(("start", which))
            progress(None, f"generating ({'configuration' if which == 'config' else 'full precision'})")
            last = None
            buf, t_emit = [], time.perf_counter()
            for c in generate_stream(m, loaded.tokenizer, prompt, max_tokens, chat=chat, temp=temp,
                                     seed=0 if temp > 0 else None, cancel=cancel):
                buf.append(c.text)
                last = c
                now = time.perf_counter()
                if now - t_emit > 0.03 or c.finish_reason:
                    emit(("chunk", which, "".join(buf), c.generation_tokens, c.generation_tps))
                    buf, t_emit = [], now
            if buf and last is not None:
                emit(("chunk", which, "".join(buf), last.generation_tokens, last.generation_tps))
            stats[which] = {"tokens": last.generation_tokens if last else 0,
                            "tps": last.generation_tps if last else 0.0,
                            "prompt_tokens": last.prompt_tokens if last else 0,
                            "prompt_tps": last.prompt_tps if last else 0.0,
                            "finish_reason": last.finish_reason if last else None}
            emit(("end", which, stats[which]["finish_reason"], stats[which]["tokens"], stats[which]["tps"]))
        return stats

    return job


def measure_decode_job(loaded, cfg, revision: int, cache: BuildCache, tokens: int = 48,
                       prompt: str = "The history of the city begins"):
    """Measured decode latency (ms/token) of the configuration in deploy mode on this machine
    (``cfg`` None: the float model)."""

    def job(progress, cancel):
        from dupstudio.core.generate import generate_stream

        if cfg is None:
            model = loaded.model
        else:
            progress(None, "building the configuration (deploy)")
            model = cache.get(loaded, cfg, revision, "deploy", cancel=cancel)
        progress(None, f"decoding {tokens} tokens")
        last = None
        for c in generate_stream(model, loaded.tokenizer, prompt, tokens, chat=False, cancel=cancel):
            last = c
        if last is None or last.generation_tps <= 0:
            return {"ms_per_token": math.nan, "tokens": 0}
        return {"ms_per_token": 1000.0 / last.generation_tps, "tokens": last.generation_tokens,
                "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps}

    return job


def measure_machine_job():
    """Run the machine micro-benchmark (core ``machine_profile``), cache and return the profile."""

    def job(progress, cancel):
        from dupstudio.core import machine_profile as MP

        return MP.load_or_measure(refresh=True, progress=progress, cancel=cancel)

    return job


# --------------------------------------------------------------------------- export
def _check_export_dir(out_dir: str) -> None:
    from dupstudio.core.jobs import DupstudioError

    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DupstudioError(f"{out}: already exists and is not empty (choose another folder)")


def preview_export_job(loaded, cfg, out_dir: str):
    """Size, bits/weight and loading needs of exporting ``cfg`` (nothing is written); refuses an
    existing non-empty ``out_dir`` early."""

    def job(progress, cancel):
        from dupstudio.core.export import preview_export

        progress(None, "estimating the export")
        _check_export_dir(out_dir)
        return preview_export(loaded, cfg)

    return job


def export_job(loaded, cfg, out_dir: str):
    def job(progress, cancel):
        from dupstudio.core.export import export_model

        progress(0.0, f"exporting to {Path(out_dir).name}")
        return export_model(loaded, cfg, out_dir, progress=progress, cancel=cancel)

    return job


# --------------------------------------------------------------------------- search
def search_job(loaded, text_path: str, budget_bpw: float, budget_latency_ms: Optional[float], settings,
               profile: Optional[str] = None, kl_windows: int = 8, max_refine: int = 4):
    """The budgeted search (core ``search.search``) on calibration windows of ``text_path``."""

    def job(progress, cancel):
        from dupstudio.core.evaluate import make_windows, read_text, tokenize
        from dupstudio.core.search import search

        progress(None, f"reading {Path(text_path).name}")
        tokens = tokenize(loaded.tokenizer, read_text(text_path))
        windows = make_windows(tokens, settings.seq_len, settings.seqs, what="calibration text")
        cancel.check()
        kw = {"profile": profile} if profile else {}
        return search(loaded, windows, budget_bpw, budget_latency_ms, settings=settings, kl_windows=kl_windows,
                      max_refine=max_refine, progress=progress, cancel=cancel, **kw)

    return job


def sensitivity_job(loaded, cfg, text_path: str, settings, *, kl_windows: int = 8, mode: str = "serial",
                    with_replica: bool = True, blocks: Optional[list] = None):
    """Per-block sensitivity (core ``sensitivity.sensitivity``) of ``cfg`` (K = 1 base) on calibration
    windows of ``text_path``; each finished block's row is emitted as it comes."""

    def job(progress, cancel, emit):
        from dupstudio.core.evaluate import make_windows, read_text, tokenize
        from dupstudio.core.sensitivity import sensitivity

        progress(None, f"reading {Path(text_path).name}")
        tokens = tokenize(loaded.tokenizer, read_text(text_path))
        windows = make_windows(tokens, settings.seq_len, settings.seqs, what="calibration text")
        cancel.check()
        return sensitivity(loaded, cfg, windows, settings=settings, kl_windows=kl_windows, replica_mode=mode,
                           with_replica=with_replica, blocks=blocks, progress=progress, cancel=cancel,
                           on_row=emit)

    return job


def run_callable(fn, *args, **kwargs):
    """A job calling ``fn(*args, **kwargs)`` (tests, small utilities)."""

    def job(progress, cancel) -> Any:
        return fn(*args, **kwargs)

    return job
