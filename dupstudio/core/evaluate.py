"""Perplexity (with a bootstrap interval over windows), KL divergence from the full-precision
model and top-1 agreement.

Protocol (one for every figure dupstudio reports, so that they compare): non-overlapping windows of ``ctx`` tokens from the start of the text;
inputs window[:-1], targets window[1:]; no BOS added; computed in the model's dtype (float32
on the CPU backend).
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DupstudioError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DupstudioError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize(tokenizer, text: str) -> np.ndarray:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the raw `tokenizers` object: fast, no length warning
        return np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    try:
        ids = tok.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tok.encode(text)
    if hasattr(ids, "ids"):
        ids = ids.ids
    return np.asarray(ids, dtype=np.int32)


def make_windows(tokens: np.ndarray, ctx: int, n: Optional[int], *, what: str = "text") -> np.ndarray:
    """(n, ctx) non-overlapping windows from the start. Raises a clear error if too short."""
    if ctx < 2:
        raise DupstudioError(f"context must be at least 2 tokens, got {ctx}")
    avail = len(tokens) // ctx
    if n is None:
        n = avail
    if avail < n or n < 1:
        raise DupstudioError(f"the {what} is too short: {len(tokens)} tokens give {avail} windows of "
                             f"{ctx}, {n} requested")
    return tokens[: n * ctx].reshape(n, ctx)


def provenance(text: str, windows: int, ctx: int, seed: int = 0, **extra) -> dict:
    import mlx.core as mx

    return {
        "text_sha256": text_sha256(text), "windows": windows, "ctx": ctx, "seed": seed,
        "mlx_version": mx.__version__, "backend": str(mx.default_device()),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        **extra,
    }


@dataclass
class EvalResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    ctx: int
    ppl_ci95: tuple
    window_nll: list = field(repr=False)
    kl: Optional[float] = None
    top1_agreement: Optional[float] = None
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_ci95"] = list(self.ppl_ci95)
        return d


def bootstrap_ppl(window_nll_sums: np.ndarray, window_tokens: np.ndarray, n_boot: int = 2000,
                  seed: int = 0) -> tuple:
    """95% percentile interval of ppl, resampling windows with replacement."""
    rng = np.random.default_rng(seed)
    n = len(window_nll_sums)
    if n < 2:
        p = float(np.exp(window_nll_sums.sum() / window_tokens.sum()))
        return (p, p)
    idx = rng.integers(0, n, size=(n_boot, n))
    ppl = np.exp(window_nll_sums[idx].sum(1) / window_tokens[idx].sum(1))
    return (float(np.percentile(ppl, 2.5)), float(np.percentile(ppl, 97.5)))


def token_scores(logits, targets, ref_logits=None) -> tuple:
    """Per position (lazy arrays shaped like ``targets``): the NLL, and with reference logits
    KL(reference || model) and top-1 agreement (None, None without). Every value depends on its
    own row of logits only, so scoring rows in chunks gives the same values."""
    import mlx.core as mx

    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if ref_logits is None:
        return nll, None, None
    rl = ref_logits.astype(mx.float32)
    rlogp = rl - mx.logsumexp(rl, axis=-1, keepdims=True)
    kl = (mx.exp(rlogp) * (rlogp - logp)).sum(-1)
    ag = (mx.argmax(rl, -1) == mx.argmax(logits, -1))
    return nll, kl, ag


def score_logits(logits, targets, ref_logits=None) -> tuple:
    """One batch: per-window NLL sums (numpy), and, with reference logits, the summed
    KL(reference || model) and the count of top-1 agreements (0.0, 0 without)."""
    import mlx.core as mx

    nll, kl, ag = token_scores(logits, targets, ref_logits)
    nll_sum = nll.sum(axis=1)
    if kl is None:
        mx.eval(nll_sum)
        return np.array(nll_sum), 0.0, 0
    mx.eval(nll_sum, kl, ag)
    return np.array(nll_sum), float(kl.sum()), int(ag.sum())


class CachedReference:
    """Full-precision log-probabilities of ``windows`` computed once and kept (float16 by
    default) so that many evaluations on the same windows share one reference pass.

    Callable like a model: ``ref(inputs)`` returns the cached log-probabilities of those inputs
    (looked up by content), so :func:`evaluate` takes it as ``reference``. float16 log-probs
    change KL by well under 0.1% (log-probs near 0, where the weight is, are exact to ~5e-4)."""

    def __init__(self, model, windows: np.ndarray, *, batch_size: int = 4, dtype=None,
                 cancel: Optional[CancelToken] = None):
        import mlx.core as mx

        self.dtype = dtype or mx.float16
        self._cache = {}
        self.nbytes = 0
        for start in range(0, len(windows), batch_size):
            if cancel is not None:
                cancel.check()
            chunk = np.ascontiguousarray(windows[start:start + batch_size, :-1])
            logits = model(mx.array(chunk)).astype(mx.float32)
            logp = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(self.dtype)
            mx.eval(logp)
            self._cache[self._key(chunk)] = logp
            self.nbytes += logp.nbytes

    @staticmethod
    def _key(a: np.ndarray):
        return (a.shape, a.astype(np.int64).tobytes())

    @staticmethod
    def estimate_bytes(windows: np.ndarray, vocab: int, dtype_bytes: int = 2) -> int:
        return int(windows.shape[0] * (windows.shape[1] - 1) * vocab * dtype_bytes)

    def __call__(self, inputs):
        key = self._key(np.array(inputs))
        if key not in self._cache:
            raise DupstudioError("CachedReference: these inputs were not cached (windows or batch size differ)")
        return self._cache[key]


def evaluate(model, windows: np.ndarray, *, reference=None, batch_size: int = 4,
             progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             seed: int = 0) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` (n, ctx); KL(reference || model) and top-1
    agreement when a full-precision ``reference`` model is given."""
    import time

    import mlx.core as mx

    progress, cancel = ensure(progress, cancel)
    t0 = time.perf_counter()
    n, ctx = windows.shape
    sums = np.zeros(n)
    kls, agree, count = 0.0, 0, 0
    for start in range(0, n, batch_size):
        cancel.check()
        chunk = mx.array(windows[start:start + batch_size])
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        logits = model(inputs)
        ref_logits = reference(inputs) if reference is not None else None
        nll_sum, kl_sum, ag = score_logits(logits, targets, ref_logits)
        kls += kl_sum
        agree += ag
        sums[start:start + batch_size] = nll_sum
        count += targets.size
        progress(min(1.0, (start + batch_size) / n), f"evaluated {min(n, start + batch_size)}/{n} windows")
    toks = np.full(n, ctx - 1)
    mean = float(sums.sum() / toks.sum())
    return EvalResult(
        ppl=float(np.exp(mean)), nll=mean, tokens=int(toks.sum()), windows=n, ctx=ctx,
        ppl_ci95=bootstrap_ppl(sums, toks, seed=seed), window_nll=(sums / toks).tolist(),
        kl=(kls / count) if reference is not None else None,
        top1_agreement=(agree / count) if reference is not None else None,
        seconds=time.perf_counter() - t0,
    )


def results_table(rows: list) -> "pandas.DataFrame":  # noqa: F821
    import pandas as pd

    return pd.DataFrame(rows)
