"""Latency measurement of deploy-mode models, and its comparison with the roofline prediction.

What is measured (:func:`time_models`), per model, for a prompt of ``prompt_tokens`` and
``gen_tokens`` generated tokens (greedy):

* **prefill**: one forward pass over the prompt into a fresh KV cache, the head on the last
  position only (what mlx-lm's generation does for a prompt shorter than its 2,048-token prefill
  step), timed to the evaluated logits: seconds per prefill, tokens/s = prompt_tokens / seconds;
* **decode**: ``gen_tokens`` steps of one token each, every step evaluated before the next one
  starts (``mx.eval`` per token: the latency of a token, graph building included; mlx-lm's
  ``stream_generate`` overlaps graph building with the previous step, which hides part of it). A
  repetition's figure is the *median* per-token time of its steps (other processes' bursts on a
  shared machine only ever add time to some steps); tokens/s = 1 / that;
* ``warmup`` untimed repetitions first, then ``repetitions`` timed ones. With several models the
  repetitions are **interleaved** (model A, B, C, then A, B, C, ...), so that a change of load on
  the machine touches every model alike and the paired ratios (:func:`paired_ratio`) stay fair;
* optionally (``per_block``) a per-block decode profile: ``mx.eval`` after every decoder block
  (and the embedding and the head) for a few steps; medians per block. The extra evaluations
  add synchronisation, so the per-block sum exceeds the plain decode time a little.

Medians and spread: each phase reports the median over repetitions, min, max and the relative
spread (max - min) / median.

Models: :func:`build_fp` (the loaded float model), :func:`build_deploy` (a configuration in
``deploy`` mode: real packed kernels), :func:`build_mlx_lm_reference` (mlx-lm's own quantization:
``mlx.nn.quantize(model, group_size, bits)`` on mlx-lm's llama, embedding included, as its
conversion does) and :func:`reference_config` (dupstudio's K = 1 configured exactly as that
conversion quantizes, so that the comparison is like with like: every block at the bits / group size and ``embedding.bits`` =
bits).

Predictions: :func:`predict_for` runs :func:`dupstudio.core.roofline.predict` for a configuration
(or the float model) at the measured settings (decode at the mean context of the generated tokens;
float weights and KV cache in the profile's compute dtype: float32 on the CPU backend, float16 for
the published profiles); :func:`compare` sets measured against predicted with and without the
floor term, both for the roofline's max(bandwidth, compute) and for its per-component sum.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure

PHASES = ("prefill", "decode")
WITHIN = 0.25  # the criterion: measured within 25% of predicted


# --------------------------------------------------------------------------- results
@dataclass
class PhaseStats:
    """One phase over the timed repetitions. ``seconds``: one figure per repetition (prefill: the
    whole prompt; decode: the median per-token time of that repetition)."""

    tokens: int
    seconds: list = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def min_s(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def max_s(self) -> float:
        return max(self.seconds) if self.seconds else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median over the repetitions (0 with one repetition)."""
        m = self.median_s
        return (self.max_s - self.min_s) / m if self.seconds and m > 0 else float("nan")

    @property
    def ms(self) -> float:
        """Median milliseconds: per prefill, or per decoded token."""
        return self.median_s * 1e3

    @property
    def tokens_per_s(self) -> float:
        m = self.median_s
        return self.tokens / m if m and m > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "median_ms": self.ms, "min_ms": self.min_s * 1e3,
                "max_ms": self.max_s * 1e3, "spread": self.spread, "tokens_per_s": self.tokens_per_s,
                "samples_ms": [s * 1e3 for s in self.seconds]}


@dataclass
class BenchResult:
    label: str
    kind: str  # "dupstudio", "mlx-lm" or "fp"
    prompt_tokens: int
    gen_tokens: int
    warmup: int
    repetitions: int
    prefill: PhaseStats
    decode: PhaseStats  # tokens = 1: seconds per token
    passes: int  # decoder-layer passes per token
    dtype: str
    per_block: Optional[dict] = None  # {"blocks_ms": [...], "embed_ms", "head_ms", "steps"}
    decode_token_ms: list = field(default_factory=list)  # every timed step, all repetitions

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.tokens_per_s

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "prompt_tokens": self.prompt_tokens,
                "gen_tokens": self.gen_tokens, "warmup": self.warmup, "repetitions": self.repetitions,
                "passes": self.passes, "dtype": self.dtype,
                "prefill": self.prefill.to_dict(), "decode": self.decode.to_dict(),
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "per_block": self.per_block}


# --------------------------------------------------------------------------- models
def build_fp(loaded) -> Any:
    """The loaded float model itself (float32 on the CPU backend)."""
    return loaded.model


def build_deploy(loaded, cfg, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None, scale_dtype=None) -> Any:
    """A configuration as real packed kernels (``replicate.build(..., "deploy")``; ``scale_dtype``
    None / "float16": scales and biases held as stored, "compute": in the compute dtype)."""
    from dupstudio.core.replicate import build

    if scale_dtype == "float16":
        scale_dtype = None
    return build(loaded, cfg, "deploy", progress=progress, cancel=cancel, scale_dtype=scale_dtype)


def build_mlx_lm_reference(loaded, bits: int, group_size: int) -> Any:
    """mlx-lm's own quantized model: a fresh copy of mlx-lm's llama from the same folder, in the
    same compute dtype, quantized by ``mlx.nn.quantize(model, group_size, bits)`` (every Linear and
    the Embedding, as mlx-lm's conversion does)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    if bits not in (2, 3, 4, 5, 6, 8):
        raise DupstudioError(f"mlx-lm quantizes at 2-8 bits, not {bits}")
    model, _ = load_model(loaded.path, lazy=True)
    dt = loaded.dtype or mx.float32
    model.update(tree_map(lambda a: a.astype(dt) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    nn.quantize(model, group_size=group_size, bits=bits)
    model.eval()
    mx.eval(model.parameters())
    return model


def reference_config(shape: dict, bits: int = 2, group_size: int = 64, source: str = ""):
    """Dupstudio's K = 1 configured exactly as mlx-lm's conversion quantizes (like with like):
    every block at ``bits`` / ``group_size``, the embedding (and tied head) too."""
    from dupstudio.core.config import new_config

    return new_config(shape, source=source, bits=bits, group_size=group_size, strategy="minmax",
                      replicas=1, embedding_bits=bits)


def uniform_config(shape: dict, bits: int = 2, group_size: int = 64, replicas: int = 1,
                   mode: str = "serial", source: str = "", embedding_bits: Optional[int] = None):
    from dupstudio.core.config import new_config

    return new_config(shape, source=source, bits=bits, group_size=group_size, replicas=replicas, mode=mode,
                      embedding_bits=embedding_bits)


def num_passes(model) -> int:
    if hasattr(model, "num_passes"):
        return int(model.num_passes)
    return len(_layers(model))


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.layers


def _make_cache(model):
    if hasattr(model, "make_cache"):
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def _hidden(model, inputs, cache):
    """The final-normed hidden states (DupModel or mlx-lm llama)."""
    if hasattr(model, "hidden"):
        return model.hidden(inputs, cache)
    return model.model(inputs, cache)


def _head(model, h):
    if hasattr(model, "hidden"):  # DupModel
        return model.head(h)
    if "lm_head" not in model:  # tied (mlx-lm decides per architecture)
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _embed(model):
    return model.embed_tokens if hasattr(model, "hidden") else model.model.embed_tokens


def _final_norm(model):
    return model.norm if hasattr(model, "hidden") else model.model.norm


def prompt_ids(tokenizer, n: int, vocab_size: Optional[int] = None) -> list:
    """``n`` deterministic prompt tokens: the project's calibration text (repeated if short),
    or, without a tokenizer, a fixed pseudo-random sequence."""
    if n < 1:
        raise DupstudioError(f"--prompt-tokens must be at least 1 (got {n})")
    ids: list = []
    if tokenizer is not None:
        try:
            from dupstudio.resources_path import resource

            text = resource("calibration/wikitext2-valid-excerpt.txt").read_text(encoding="utf-8")[:20000]
            ids = list(tokenizer.encode(text))
        except Exception:  # noqa: BLE001 - any tokenizer / resource trouble: fall back
            ids = []
    if not ids:
        v = int(vocab_size or 256)
        ids = [(1103515245 * i + 12345) % v for i in range(n)]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# --------------------------------------------------------------------------- timing
def _run_once(model, ids, gen_tokens: int, cancel: CancelToken) -> tuple:
    """(prefill seconds, [decode seconds per step]) of one repetition."""
    import mlx.core as mx

    cache = _make_cache(model)
    x = mx.array(ids)[None]
    t0 = time.perf_counter()
    h = _hidden(model, x, cache)
    logits = _head(model, h[:, -1:, :])
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok)
    t_prefill = time.perf_counter() - t0
    steps = []
    for _ in range(gen_tokens):
        cancel.check()
        t0 = time.perf_counter()
        logits = model(tok[:, None], cache)
        tok = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tok)
        steps.append(time.perf_counter() - t0)
    return t_prefill, steps


def time_blocks(model, ids, steps: int = 4, cancel: Optional[CancelToken] = None) -> dict:
    """Per-block decode profile: after a prefill of ``ids``, ``steps`` decode steps with an
    ``mx.eval`` after the embedding, after every decoder block (all K passes of a replicated
    block) and after the final norm + head; medians in milliseconds."""
    import mlx.core as mx

    cancel = cancel or CancelToken()
    cache = _make_cache(model)
    x = mx.array(ids)[None]
    h = _hidden(model, x, cache)
    tok = mx.argmax(_head(model, h[:, -1:, :])[:, -1, :], axis=-1)
    mx.eval(tok)
    dup = hasattr(model, "blocks")
    units = model.blocks if dup else _layers(model)
    t_emb, t_head, t_blocks = [], [], [[] for _ in units]
    for _ in range(max(1, steps)):
        cancel.check()
        t0 = time.perf_counter()
        h = _embed(model)(tok[:, None])
        mx.eval(h)
        t_emb.append(time.perf_counter() - t0)
        j = 0
        for u, unit in enumerate(units):
            t0 = time.perf_counter()
            if dup:
                K = len(unit.replicas)
                h = unit(h, None, cache[j:j + K])
                j += K
            else:
                h = unit(h, None, cache=cache[u])
            mx.eval(h)
            t_blocks[u].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        logits = _head(model, _final_norm(model)(h))
        tok = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(tok)
        t_head.append(time.perf_counter() - t0)
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    blocks_ms = [med(t) for t in t_blocks]
    return {"steps": max(1, steps), "embed_ms": med(t_emb), "head_ms": med(t_head), "blocks_ms": blocks_ms,
            "blocks_total_ms": sum(blocks_ms), "total_ms": med(t_emb) + med(t_head) + sum(blocks_ms)}


def time_models(models: Sequence[tuple], prompt_tokens: int = 128, gen_tokens: int = 64, *,
                ids: Optional[list] = None, tokenizer=None, vocab_size: Optional[int] = None,
                warmup: int = 1, repetitions: int = 3, per_block: bool = False, per_block_steps: int = 4,
                warmup_tokens: Optional[tuple] = None, before_round: Optional[Callable[[int], None]] = None,
                progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> list[BenchResult]:
    """Time ``models`` (a list of ``(label, kind, model)``), repetitions interleaved; see the
    module docstring. ``ids``: the prompt (default :func:`prompt_ids`). ``warmup_tokens``:
    (prompt, generated) tokens of the warm-up runs (default: the timed lengths).
    ``before_round(i)``: called before timed round i (0-based), e.g. to re-measure the machine
    profile beside the runs it predicts."""
    import mlx.core as mx

    progress, cancel = ensure(progress, cancel)
    if gen_tokens < 1:
        raise DupstudioError(f"--gen-tokens must be at least 1 (got {gen_tokens})")
    if repetitions < 1 or warmup < 0:
        raise DupstudioError("repetitions must be >= 1 and warmup >= 0")
    if not models:
        raise DupstudioError("nothing to measure")
    ids = list(ids) if ids is not None else prompt_ids(tokenizer, prompt_tokens, vocab_size)
    prompt_tokens = len(ids)
    results = []
    for label, kind, model in models:
        params = [a for a in _flat(model.parameters()) if mx.issubdtype(a.dtype, mx.floating)]
        dtype = str(params[0].dtype).replace("mlx.core.", "") if params else "?"
        results.append(BenchResult(label=label, kind=kind, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                   warmup=warmup, repetitions=repetitions, prefill=PhaseStats(prompt_tokens),
                                   decode=PhaseStats(1), passes=num_passes(model), dtype=dtype))
    total = (warmup + repetitions) * len(models) + (len(models) if per_block else 0)
    done = 0
    w_ids, w_gen = ids, gen_tokens
    if warmup_tokens is not None:
        w_ids, w_gen = ids[:max(1, int(warmup_tokens[0]))], max(1, int(warmup_tokens[1]))
    for rep in range(warmup + repetitions):
        if rep >= warmup and before_round is not None:
            cancel.check()
            progress(done / total, f"before round {rep - warmup + 1}/{repetitions}")
            before_round(rep - warmup)
        for (label, _, model), res in zip(models, results):
            cancel.check()
            what = f"warm-up {rep + 1}/{warmup}" if rep < warmup else f"repetition {rep - warmup + 1}/{repetitions}"
            progress(done / total, f"{label}: {what}")
            if rep < warmup:
                _run_once(model, w_ids, w_gen, cancel)
                done += 1
                continue
            t_pre, steps = _run_once(model, ids, gen_tokens, cancel)
            if rep >= warmup:
                res.prefill.seconds.append(t_pre)
                res.decode.seconds.append(statistics.median(steps))
                res.decode_token_ms.extend(s * 1e3 for s in steps)
            done += 1
    if per_block:
        for (label, _, model), res in zip(models, results):
            progress(done / total, f"{label}: per-block decode profile")
            res.per_block = time_blocks(model, ids, per_block_steps, cancel)
            done += 1
    progress(1.0, "measured")
    return results


def _flat(params):
    from mlx.utils import tree_flatten

    return [a for _, a in tree_flatten(params)]


def paired_ratio(a: BenchResult, b: BenchResult, phase: str = "decode") -> dict:
    """a / b per repetition (interleaved repetitions are paired), median and range."""
    xs = [x / y for x, y in zip(getattr(a, phase).seconds, getattr(b, phase).seconds) if y > 0]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "pairs": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "pairs": xs}


# --------------------------------------------------------------------------- predictions
def float_bits_of(profile) -> int:
    """Float weights' bits in the profile's deployment: 32 on the CPU backend, else 16."""
    return 32 if getattr(profile, "compute_dtype", "float16") == "float32" else 16


def decode_context(prompt_tokens: int, gen_tokens: int) -> int:
    """The mean context of the generated tokens' decode steps."""
    return int(prompt_tokens + (gen_tokens - 1) / 2)


def predict_for(shape: dict, profile, cfg=None, *, prompt_tokens: int = 128, gen_tokens: int = 64,
                fp: bool = False, label: str = "", as_built: bool = True):
    """The roofline prediction for a configuration (``cfg``) or the float model (``fp``) at the
    measured settings, on ``profile`` (a name or a HardwareProfile)."""
    from dupstudio.core import roofline as RF

    prof = profile if isinstance(profile, RF.HardwareProfile) else RF.get_profile(profile)
    fb = float_bits_of(prof)
    if fp:
        plans, embed = RF.uniform_plan(shape, bits=fb), RF.EmbedPlan(bits=fb)
    else:
        if cfg is None:
            raise DupstudioError("predict_for: a configuration or fp=True")
        plans, embed = RF.plans_from_config(cfg, shape, float_bits=fb, as_built=as_built)
    return RF.predict(shape, plans, prof, embed=embed, context=decode_context(prompt_tokens, gen_tokens),
                      prefill_tokens=prompt_tokens, prefill_logits="last", kv_bytes=fb // 8, label=label)


def _pred_ms(res, phase: str, assumption: str) -> dict:
    e = getattr(res, phase)[assumption]
    return {"with_floor": e.predicted_ms, "no_floor": e.predicted_no_floor_ms,
            "per_component": e.predicted_per_component_ms,
            "per_component_no_floor": e.predicted_per_component_ms - e.overhead_ms,
            "bandwidth_ms": e.bandwidth_ms, "compute_ms": e.compute_ms, "overhead_ms": e.overhead_ms}


def compare(measured: BenchResult, prediction, within: float = WITHIN) -> dict:
    """Measured vs predicted (per phase and assumption): ratios measured / predicted, with and
    without the floor term, for the max(bandwidth, compute) form and the per-component sum;
    ``ok`` = within ±``within`` (of the predicted figure)."""
    out: dict = {}
    for phase in PHASES:
        m_ms = getattr(measured, phase).ms
        out[phase] = {"measured_ms": m_ms, "assumptions": {}}
        for a in ("cache", "dram", "measured"):
            p = _pred_ms(prediction, phase, a)
            row = dict(p)
            for key in ("with_floor", "no_floor", "per_component", "per_component_no_floor"):
                r = m_ms / p[key] if p[key] > 0 else float("nan")
                row[f"ratio_{key}"] = r
                row[f"ok_{key}"] = bool(math.isfinite(r) and abs(r - 1) <= within)
            out[phase]["assumptions"][a] = row
    return out


def machine_summary() -> dict:
    """What the numbers were measured on (backend, CPU, load)."""
    import os

    import mlx.core as mx

    from dupstudio.core.machine_profile import backend, device_name

    d = {"backend": backend(), "device": device_name() or platform.processor() or platform.machine(),
         "mlx_version": mx.__version__, "cpus": os.cpu_count()}
    try:
        d["loadavg"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return d


# --------------------------------------------------------------------------- one call
def bench_config(loaded, cfg, *, prompt_tokens: int = 128, gen_tokens: int = 64, warmup: int = 1,
                 repetitions: int = 3, per_block: bool = False, reference_mlx_lm: bool = False,
                 fp: bool = False, label: str = "config", machine_profile=None, profile=None,
                 scale_dtype: Optional[str] = None,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> dict:
    """Measure a configuration in deploy mode (optionally beside mlx-lm's own quantization of the
    same bits, dupstudio's K = 1 configured like it, and the float model) and compare with the
    roofline: on ``machine_profile`` (this machine's measured profile; None: no comparison) and, as
    a prediction only, on ``profile``. ``scale_dtype``: how the configuration's deployed scales are
    held ("float16" / None as stored, "compute"). With ``reference_mlx_lm``, dupstudio's K = 1
    configured as mlx-lm quantizes is measured with float16 scales (the default build) and, where
    the compute dtype is not float16, also with compute-dtype scales (as mlx-lm's model holds them);
    ``wrapper_ratio`` gives both against mlx-lm. Returns a JSON-ready dict."""
    import mlx.core as mx

    from dupstudio.core.model_io import model_shape

    progress, cancel = ensure(progress, cancel)
    shape = model_shape(loaded.config)
    bits, g = cfg.defaults.bits, cfg.defaults.group_size
    entries = [(label, "dupstudio", cfg, scale_dtype)]
    ref_idx = {}
    if reference_mlx_lm:
        ref = reference_config(shape, bits, g, cfg.model.source)
        ref_idx["default"] = len(entries)
        entries.append((f"dupstudio K=1 {bits}-bit g{g} as mlx-lm (fp16 sc.)", "dupstudio", ref, None))
        if (loaded.dtype or mx.float32) != mx.float16:
            ref_idx["compute"] = len(entries)
            entries.append((f"dupstudio K=1 {bits}-bit g{g} as mlx-lm (compute-dtype sc.)", "dupstudio", ref,
                            "compute"))
        ref_idx["mlx-lm"] = len(entries)
        entries.append((f"mlx-lm {bits}-bit g{g}", "mlx-lm", None, None))
    if fp:
        entries.append(("fp", "fp", None, None))
    models = []
    for i, (lab, kind, c, sd) in enumerate(entries):
        cancel.check()
        progress(0.1 * i / len(entries), f"building {lab}")
        if kind == "dupstudio":
            m = build_deploy(loaded, c, cancel=cancel, scale_dtype=sd)
        elif kind == "mlx-lm":
            m = build_mlx_lm_reference(loaded, bits, g)
        else:
            m = build_fp(loaded)
        models.append((lab, kind, m))

    def sub(f, msg):
        progress(0.1 + 0.9 * (f or 0.0), msg)

    results = time_models(models, prompt_tokens, gen_tokens, tokenizer=loaded.tokenizer,
                          vocab_size=shape["vocab_size"], warmup=warmup, repetitions=repetitions,
                          per_block=per_block, progress=sub, cancel=cancel)
    rows = []
    for (lab, kind, c, _), res in zip(entries, results):
        row: dict = {"label": lab, "kind": kind, "measured": res.to_dict()}
        ref_cfg = c if c is not None else (reference_config(shape, bits, g) if kind == "mlx-lm" else None)
        for key, prof in (("this_machine", machine_profile), ("profile", profile)):
            if prof is None:
                continue
            pred = predict_for(shape, prof, ref_cfg, prompt_tokens=res.prompt_tokens, gen_tokens=gen_tokens,
                               fp=kind == "fp", label=lab)
            row[key] = {"profile": pred.profile, "decode": {a: e.to_dict() for a, e in pred.decode.items()},
                        "prefill": {a: e.to_dict() for a, e in pred.prefill.items()}}
            if key == "this_machine":
                row["comparison"] = compare(res, pred)
        rows.append(row)
    out = {"prompt_tokens": results[0].prompt_tokens, "gen_tokens": gen_tokens, "warmup": warmup,
           "repetitions": repetitions, "decode_context": decode_context(results[0].prompt_tokens, gen_tokens),
           "machine": machine_summary(), "results": rows,
           "machine_profile": machine_profile.name if machine_profile is not None else None,
           "profile": profile.name if profile is not None else None}
    if reference_mlx_lm:
        mlm = results[ref_idx["mlx-lm"]]
        out["wrapper_ratio"] = {key: {ph: paired_ratio(results[i], mlm, ph) for ph in PHASES}
                                for key, i in ref_idx.items() if key != "mlx-lm"}
        out["wrapper_ratio"]["note"] = ("dupstudio K=1 configured as mlx-lm quantizes / mlx-lm's own model, "
                                        "per interleaved repetition (1.05 = 5% dupstudio overhead); 'default': "
                                        "float16 scales as stored, 'compute': scales held in the compute dtype")
    return out


__all__ = ["PhaseStats", "BenchResult", "build_fp", "build_deploy", "build_mlx_lm_reference", "reference_config",
           "uniform_config", "prompt_ids", "time_models", "time_blocks", "paired_ratio", "predict_for", "compare",
           "decode_context", "float_bits_of", "machine_summary", "bench_config", "num_passes"]
