"""GPTQ on MLX's affine grid: choose a layer's codes by error feedback through XᵀX.

For a linear layer ``y = W x`` whose inputs have second moment ``H = XᵀX/n``, quantizing column
``j`` of ``W`` to ``q_j`` changes the output error by ``(w_j - q_j)ᵀ H (w_j - q_j)``-type terms that
the not yet quantized columns can partly cancel: the optimal update of the remaining columns is
``-(w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_{j, j+1:}`` (optimal brain surgeon). Done column by column with
the Cholesky factor of ``H⁻¹`` (Frantar et al., 2022) this costs one triangular factorisation.

Groups: each group of ``group_size`` input columns gets its scale/bias from the *error-updated*
weights when the group starts (the primary replica's strategy, ``minmax`` by default), so the grid
follows the weights the earlier columns' feedback produced. Columns are processed one group at a time
and the feedback to later groups is applied as one matrix product per group.

With ``act_order`` the columns are visited in order of decreasing ``H`` diagonal (the most sensitive
first); groups then keep their storage order (MLX groups are contiguous columns), so their
scales/biases are computed up front from the original weights ("static groups").

Everything runs in float64 numpy: the layers of the models this tool targets are at most a few
thousand columns wide and the factorisation needs the precision.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from dupstudio.core import quant
from dupstudio.core.jobs import DupstudioError


def _group_params(w: np.ndarray, bits: int, strategy: str, sargs: dict):
    """(scale, bias) per row for one group of columns ``w`` (out, g), as float64."""
    p = quant.compute_params(mx.array(w.astype(np.float32)), bits, w.shape[1], strategy, **sargs)
    return (np.array(p.scales, dtype=np.float64)[:, 0], np.array(p.biases, dtype=np.float64)[:, 0])


def _round(w, s, b, n):
    q = np.clip(np.rint((w - b) / s), 0, n)
    return q, s * q + b


def prepare_hessian(h: np.ndarray, w: np.ndarray, damp: float):
    """Dampened Hessian and weights with dead input columns zeroed (a column whose input is
    always zero carries no information; its weight is irrelevant and set to the grid's zero)."""
    h = np.array(h, dtype=np.float64, copy=True)
    w = np.array(w, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    return h, w


def gptq_codes(w, h, bits: int, group_size: int, *, strategy: str = "minmax",
               strategy_args: dict | None = None, damp: float = 0.01,
               act_order: bool = False):
    """Codes (out, in) uint8 and the per-group float32 (scales, biases) GPTQ chose for ``w``.

    ``w``: (out, in) weights; ``h``: (in, in) second moment of the layer's inputs (any positive
    multiple of XᵀX); ``damp``: share of the mean diagonal added to it."""
    sargs = dict(strategy_args or {})
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise DupstudioError(f"GPTQ: Hessian {h.shape} does not match a layer with {in_f} inputs")
    if in_f % group_size:
        raise DupstudioError(f"GPTQ: group size {group_size} does not divide {in_f} columns")
    if not np.isfinite(h).all() or not np.isfinite(w).all():
        raise DupstudioError("GPTQ: the layer's weights or input statistics are not finite")
    n = float((1 << bits) - 1)
    h, w = prepare_hessian(h, w, damp)
    G = in_f // group_size
    scales = np.zeros((out_f, G))
    biases = np.zeros((out_f, G))
    if act_order:
        for gi in range(G):
            cols = slice(gi * group_size, (gi + 1) * group_size)
            scales[:, gi], biases[:, gi] = _group_params(w[:, cols], bits, strategy, sargs)
        perm = np.argsort(-np.diag(h), kind="stable")
    else:
        perm = np.arange(in_f)
    inv = np.argsort(perm)
    W = w[:, perm]
    H = h[np.ix_(perm, perm)]
    # upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row j of U holds the feedback coefficients of
    # column j onto the columns after it, already conditioned on the columns before it
    try:
        L = np.linalg.cholesky(H)
        Hinv = np.linalg.inv(L).T @ np.linalg.inv(L)
        U = np.linalg.cholesky(Hinv).T
    except np.linalg.LinAlgError:
        raise DupstudioError("GPTQ: the layer's input Hessian is not positive definite; "
                             "raise the dampening") from None
    Q = np.zeros_like(W)
    block = group_size
    for i1 in range(0, in_f, block):
        i2 = min(in_f, i1 + block)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if not act_order:
            gi = i1 // group_size
            scales[:, gi], biases[:, gi] = _group_params(W1, bits, strategy, sargs)
        for i in range(i2 - i1):
            col = i1 + i
            gi = perm[col] // group_size
            s, b = scales[:, gi], biases[:, gi]
            q, deq = _round(W1[:, i], s, b, n)
            Q[:, col] = q
            err = (W1[:, i] - deq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = Q[:, inv].astype(np.uint8)
    return codes, scales.astype(np.float32), biases.astype(np.float32)


def gptq_reference(w, h, bits: int, group_size: int, *, damp: float = 0.01):
    """The textbook form, for tests: one column at a time with the full inverse Hessian downdated
    after each column (no Cholesky, no blocking), group parameters (min-max) from the updated
    weights when each group starts. Slow; natural column order only."""
    w = np.asarray(w, dtype=np.float64)
    h, W = prepare_hessian(h, w, damp)
    out_f, in_f = W.shape
    n = float((1 << bits) - 1)
    Hinv = np.linalg.inv(h)
    Q = np.zeros_like(W)
    s = b = None
    for j in range(in_f):
        if j % group_size == 0:
            s, b = _group_params(W[:, j:j + group_size], bits, "minmax", {})
        q, deq = _round(W[:, j], s, b, n)
        Q[:, j] = q
        err = (W[:, j] - deq) / Hinv[j, j]
        W[:, j:] -= np.outer(err, Hinv[j, j:])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q.astype(np.uint8)
