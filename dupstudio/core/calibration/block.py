"""One block's calibration problem: block k's replicas tuned to match the float block's output.

:func:`calibrate_block` takes block k's float layer and weights, its inputs ``x`` and targets
``y`` (the float block's output) and returns the tuned tensors, gains and residual gain with the
losses before and after. How the inputs and targets are produced block after block is
:mod:`dupstudio.core.calibration.loop`'s business.

Codes stay fixed (the primary replica's, from its scale/zero strategy, or GPTQ's; method ``ap``
learns them by rounding trainable latent values). Parameters tuned: per-group scales and biases
of every replica (``s = s0·exp(u)``, ``b = b0 + s0·d``), per-row scale/offset of ``channel``
replicas, optional per-row and tied per-column gains, replica gains α (serial) / w (parallel),
and optionally the block's residual gain β. Replicas start at α = 0 (parallel: w = [1, 0, ...]),
i.e. equal to K = 1.

Methods:

* ``stats``  closed forms from activation statistics: per matrix, the code strategy with the
  lowest activation-weighted error (diag of XᵀX), per-row least squares of group scale/bias
  weighted by the layer's input XᵀX, and α/w by least squares on the block output;
* ``grid``   grid search over replica γ, grid offset, clipping and α minimising block loss;
* ``adam``   closed-form start (``init="closed_form"``) or round-to-nearest start, then
  ``steps`` Adam steps per block on the block-output loss through MLX autodiff;
* ``ap``     ``adam`` with learned rounding (latent codes, straight-through gradient).

Every method keeps a block's new parameters only if its loss over all calibration sequences
went down (the never-worse guard).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dupstudio.core import adapters, quant
from dupstudio.core.config import COL_GROUPS
from dupstudio.core.model_io import LoadedModel, model_shape
from dupstudio.core.replicate import fold_vector, replica_init

# --------------------------------------------------------------------------- block forward
class _Recorder(nn.Module):
    """Stands in for a linear layer and keeps the first input it sees under ``key`` (the idea
    of mlx-lm's GPTQ "Catcher"), then computes the linear as usual."""

    def __init__(self, inner, sink: dict, key: str):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_sink", sink)  # plain state, not a child module
        object.__setattr__(self, "_key", key)

    def __call__(self, x):
        self._sink.setdefault(self._key, x)
        return self.inner(x)


def block_forward(blk, x, mask, collect: bool = False):
    """The decoder block ``blk`` (mlx-lm's own block of its architecture) applied to ``x``
    without a cache; with ``collect``, also the input of each linear group: attn (q/k/v), o,
    mlp (gate/up), down, recorded by wrapping the first linear reading each group in a copy of
    the block's structure (the block itself is not changed)."""
    if not collect:
        return blk(x, mask, None)
    arch = adapters.of_layer(blk)
    acts: dict = {}
    rec = adapters.clone(blk)
    wrapped = set()
    for mat in arch.matrices:
        if mat.reads not in wrapped:
            wrapped.add(mat.reads)
            adapters.set_module(rec, mat.path, _Recorder(adapters.get_module(blk, mat.path), acts, mat.reads))
    out = rec(x, mask, None)
    return out, acts


def _set_block_weights(tmpl, W: dict, norms: dict, lin_bias: Optional[dict] = None) -> None:
    """Put matrix weights ``W`` (name -> (out, in)), column-gain norm weights ``norms`` (path ->
    weight) and linear biases (name -> bias) into the template block."""
    for m, w in W.items():
        lin = adapters.get_module(tmpl, adapters.MATRIX_PATHS[m])
        lin.weight = w
        if lin_bias and m in lin_bias:
            lin.bias = lin_bias[m]
    for path, w in norms.items():
        adapters.get_module(tmpl, path).weight = w


def _block_weights(tmpl, arch) -> dict:
    return {m.name: adapters.get_module(tmpl, m.path).weight for m in arch.matrices}


def embed_inputs(loaded: LoadedModel, emb, toks) -> mx.array:
    """Block 0's input (float32) for tokens ``toks`` through embedding module ``emb``, as the
    architecture's model makes it (Gemma 3 scales the embedding by √hidden)."""
    h = adapters.of_model(loaded.model).scale_embeddings(emb(toks), loaded.model.args)
    return h.astype(mx.float32)


def chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


# --------------------------------------------------------------------------- closed forms
#: ridge of the closed-form start. 1e-2 (was 1e-3): on the default model with the fast preset
#: (8,192 calibration tokens) the less-shrunk start over-fits Σ: H200, WikiText-2 test 40×512,
#: calibrated K=1 2-bit g32 ppl 352 → 124, g64 268 → 225 (docs/results/ridge.md).
LSQ_RIDGE = 1e-2


def weighted_lsq(w: mx.array, codes: mx.array, group_size: int, sigma: mx.array,
                 s0: mx.array, b0: mx.array, ridge: float = LSQ_RIDGE, chunk: int = 64):
    """Per row, the group scales/biases minimising (w - ŵ)ᵀ Σ (w - ŵ) with codes fixed,
    Σ = XᵀX/n of the layer's input. Ridge-regularised towards (s0, b0) (``ridge`` × mean diag Σ ×
    group size; see :data:`LSQ_RIDGE`)."""
    out, inn = w.shape
    G = inn // group_size
    E = mx.repeat(mx.eye(G), group_size, axis=0)  # (in, G)
    SE = sigma @ E  # (in, G)
    s_out, b_out = [], []
    sig_tr = float(mx.mean(mx.diagonal(sigma)))
    for sl in chunks(out, chunk):
        q = codes[sl].astype(mx.float32)  # (c, in)
        Eq = q[:, :, None] * E[None]  # (c, in, G)
        SEq = mx.matmul(sigma[None], Eq)  # (c, in, G)
        A = mx.concatenate([Eq, mx.broadcast_to(E[None], Eq.shape)], axis=2)  # (c, in, 2G)
        SA = mx.concatenate([SEq, mx.broadcast_to(SE[None], SEq.shape)], axis=2)
        M = mx.matmul(A.transpose(0, 2, 1), SA)  # (c, 2G, 2G)
        v = mx.matmul(SA.transpose(0, 2, 1), w[sl].astype(mx.float32)[:, :, None])[..., 0]
        mx.eval(M, v)
        M, v = np.array(M, dtype=np.float64), np.array(v, dtype=np.float64)
        theta0 = np.concatenate([np.array(s0[sl]), np.array(b0[sl])], axis=1).astype(np.float64)
        lam = ridge * sig_tr * group_size
        M = M + lam * np.eye(2 * G)[None]
        v = v + lam * theta0
        try:
            theta = np.linalg.solve(M, v[..., None])[..., 0]
        except np.linalg.LinAlgError:
            theta = theta0
        bad = ~np.isfinite(theta).all(axis=1)
        theta[bad] = theta0[bad]
        s_out.append(theta[:, :G])
        b_out.append(theta[:, G:])
    s = mx.array(np.concatenate(s_out).astype(np.float32))
    b = mx.array(np.concatenate(b_out).astype(np.float32))
    # keep scales away from zero/sign flips
    s = mx.where(mx.abs(s) < 1e-3 * mx.abs(s0), s0, s)
    return s, b


def weighted_error(w, what, sigma_diag):
    d = (w - what) ** 2
    return float((d * sigma_diag[None, :]).sum())


STATS_CANDIDATES = (("minmax", {}), ("percentile", {"p": 99.9}), ("ksigma", {"k": 3.0}),
                    ("search", {"error": "act"}))


# --------------------------------------------------------------------------- the calibrator
@dataclass
class BlockResult:
    index: int
    loss_before: float
    loss_after: float
    accepted: bool
    seconds: float
    steps: int
    method: str
    curve: list = field(default_factory=list)


class _BlockProblem:
    """Trainable parametrisation of one block's replicas over fixed codes."""

    def __init__(self, args, fp_layer, spec, bits, group_size, codes, base_sb, rep_sb, settings,
                 shape: Optional[dict] = None, latent0: Optional[dict] = None):
        self.args = args
        self.arch = arch = adapters.of_layer(fp_layer)
        self.names = names = arch.matrix_names
        # the template: a structural copy of the float block (the architecture's own class),
        # float32, with plain linears whose weights each forward sets
        self.tmpl = adapters.clone(fp_layer)
        adapters.cast_floating(self.tmpl, mx.float32)
        self.lin_bias = {}
        for mat in arch.matrices:
            src = adapters.get_module(fp_layer, mat.path)
            b = adapters.linear_bias(src)
            out_f, in_f = codes[mat.name].shape
            adapters.set_module(self.tmpl, mat.path, nn.Linear(in_f, out_f, bias=b is not None))
            if b is not None:
                self.lin_bias[mat.name] = b.astype(mx.float32)
        # its initial weights (lazy, never evaluated): put back after each forward so the
        # template does not keep the last replica's dequantized weights alive between steps
        self.norm0 = {path: adapters.get_module(fp_layer, path).weight.astype(mx.float32)
                      for path in arch.col_norms.values()}
        self._blank = (_block_weights(self.tmpl, arch),
                       {path: adapters.get_module(self.tmpl, path).weight for path in self.norm0},
                       dict(self.lin_bias))
        self.K = spec.replicas
        self.mode = spec.mode
        self.spec = spec
        self.bits, self.g = bits, group_size
        self.settings = settings
        self.codes = {m: codes[m].astype(mx.float32).reshape(codes[m].shape[0], -1, group_size)
                      for m in names}
        self.shapes = {m: codes[m].shape for m in names}
        # where the o / down column gains fold: (matrix, first row, end row)
        self.folds = {}
        for grp in ("o", "down"):
            if shape is not None:
                self.folds[grp] = arch.fold_rows(grp, shape)
            else:  # a matrix of its own (llama): all its rows
                m = arch.fold_matrix(grp)
                self.folds[grp] = (m, 0, self.shapes[m][0])
        self.base = rep_sb  # per replica: m -> (s0, b0) (channel replicas: unused)
        self.sbar = {m: mx.mean(mx.abs(base_sb[m][0]), axis=1) for m in names}
        # learned rounding: code = round(clip(z0 + c·v)), v trained from 0. z0 (code units) starts
        # each weight at its starting code plus how far the float weight sat from it, so step 0
        # reproduces the starting codes and the weights nearest a rounding boundary flip first.
        # c turns Adam's learning rate for the scales into the latent step ``ap_lr``.
        self.latent0 = latent0
        self.qmax = float(2 ** bits - 1)
        self.lat_scale = settings.ap_lr / settings.lr if latent0 is not None else 0.0

    def init_params(self, gains=None, residual=1.0, start_at_k1=True) -> dict:
        P = {"rep": []}
        for i in range(self.K):
            rp = {}
            gran = "group" if i == 0 else self.spec.replica[i].granularity
            for m in self.names:
                out, G = self.codes[m].shape[:2]
                if gran == "group":
                    rp[m] = {"u": mx.zeros((out, G)), "d": mx.zeros((out, G))}
                else:
                    rp[m] = {"ua": mx.zeros((out,)), "dc": mx.zeros((out,))}
                if self.settings.gains:
                    rp[m]["row"] = mx.zeros((out,))
            if self.settings.gains:
                H = self.args.hidden_size
                fo, fd = self.folds["o"], self.folds["down"]
                rp["col"] = {"attn": mx.zeros((H,)), "mlp": mx.zeros((H,)),
                             "o": mx.zeros((fo[2] - fo[1],)), "down": mx.zeros((fd[2] - fd[1],))}
            P["rep"].append(rp)
        if gains is None:
            if self.mode == "serial":
                gains = [1.0] + [0.0 if start_at_k1 else 1.0] * (self.K - 1)
            else:
                gains = [1.0] + [0.0] * (self.K - 1) if start_at_k1 else [1.0 / self.K] * self.K
        P["gains"] = mx.array(gains, dtype=mx.float32)
        P["beta"] = mx.array(float(residual))
        if self.latent0 is not None:
            P["lat"] = {m: mx.zeros(self.latent0[m].shape) for m in self.names}
        return P

    def codes_of(self, P, m):
        """Matrix m's codes (float, grouped): fixed, or rounded from the latent values with a
        straight-through gradient (the rounding passes the gradient on unchanged)."""
        if "lat" not in P:
            return self.codes[m]
        z = mx.clip(self.latent0[m] + self.lat_scale * P["lat"][m], 0.0, self.qmax)
        return z + mx.stop_gradient(mx.round(z) - z)

    def final_codes(self, P) -> dict:
        """The integer codes the trained latents round to (uint8, matrix shape)."""
        return {m: mx.round(mx.stop_gradient(self.codes_of(P, m))).astype(mx.uint8).reshape(self.shapes[m])
                for m in self.names}

    def replica_sb(self, P, i):
        """(scales, biases) per matrix of replica i (raw, before row/col gains)."""
        out = {}
        rp = P["rep"][i]
        for m in self.names:
            if "u" in rp[m]:
                s0, b0 = self.base[i][m]
                out[m] = (s0 * mx.exp(rp[m]["u"]), b0 + s0 * rp[m]["d"])
            else:
                s1, b1 = self.replica_sb_cache[m]
                a = mx.exp(rp[m]["ua"])[:, None]
                c = (self.sbar[m] * rp[m]["dc"])[:, None]
                out[m] = (s1 * a, b1 * a + c)
        return out

    def weights(self, P, i):
        sb = self.replica_sb(P, i)
        if i == 0:
            self.replica_sb_cache = sb
        rp = P["rep"][i]
        W, LB = {}, {}
        for m in self.names:
            s, b = sb[m]
            w = (s[..., None] * self.codes_of(P, m) + b[..., None]).reshape(self.shapes[m])
            mult = None
            if "row" in rp[m]:
                mult = 1.0 + rp[m]["row"]
            if "col" in rp:
                for grp in ("o", "down"):
                    fm, start, _ = self.folds[grp]
                    if m == fm:
                        v = fold_vector(1.0 + rp["col"][grp], start, self.shapes[m][0])
                        mult = v if mult is None else mult * v
            if mult is not None:
                w = w * mult[:, None]
            W[m] = w
            if m in self.lin_bias:
                LB[m] = self.lin_bias[m] if mult is None else self.lin_bias[m] * mult
        if "col" in rp:
            norms = {path: self.arch.fold_norm(self.norm0[path], 1.0 + rp["col"][grp])
                     for grp, path in self.arch.col_norms.items()}
        else:
            norms = dict(self.norm0)
        return W, norms, LB

    def forward(self, P, x, mask):
        Ws = [self.weights(P, i) for i in range(self.K)]

        def f(i, inp):
            _set_block_weights(self.tmpl, *Ws[i])
            return block_forward(self.tmpl, inp, mask)

        g = P["gains"]
        if self.mode == "serial":
            y = f(0, x)
            for i in range(1, self.K):
                y = y + g[i] * (f(i, y) - y)
        else:
            y = x
            for i in range(self.K):
                y = y + g[i] * (f(i, x) - x)
        _set_block_weights(self.tmpl, *self._blank)
        return x + P["beta"] * (y - x)

    def export(self, P, k: int) -> tuple:
        """(sidecar tensors for block k, gains list, residual gain)."""
        t = {}
        for i in range(self.K):
            sb = self.replica_sb(P, i)
            if i == 0:
                self.replica_sb_cache = sb
            rp = P["rep"][i]
            for m in self.names:
                pre = f"b{k}.r{i}.{m}"
                if "u" in rp[m]:
                    t[f"{pre}.scales"] = sb[m][0].astype(mx.float16)
                    t[f"{pre}.biases"] = sb[m][1].astype(mx.float16)
                else:
                    t[f"{pre}.ch_scale"] = mx.exp(rp[m]["ua"]).astype(mx.float16)
                    t[f"{pre}.ch_offset"] = (self.sbar[m] * rp[m]["dc"]).astype(mx.float16)
                if "row" in rp[m]:
                    t[f"{pre}.row_gain"] = (1.0 + rp[m]["row"]).astype(mx.float16)
            if "col" in rp:
                for c in COL_GROUPS:
                    t[f"b{k}.r{i}.col.{c}"] = (1.0 + rp["col"][c]).astype(mx.float16)
        gains = [float(v) for v in np.array(P["gains"])]
        if self.mode == "serial":
            gains[0] = 1.0
        return t, gains, float(P["beta"].item())


def calibrate_block(loaded, cfg, k, float_w, layer, x, y, mask, settings, rng, progress,
                    cancel, on_loss, n_blocks):
    """Calibrate block k of ``cfg`` on inputs ``x`` towards targets ``y`` (both (seqs, T, H),
    float32 MLX arrays). ``float_w``: matrix name -> block k's float weight; ``layer``: block k's
    float decoder layer; ``rng``: the run's generator (batches and held-out sequences are drawn
    from it, block after block). Returns ``(BlockResult, tensors, gains, beta)``; the caller
    keeps the tensors and gains only when ``result.accepted`` (see
    :func:`dupstudio.core.calibration.checkpoints.record_block`)."""
    t0 = time.perf_counter()
    spec = cfg.blocks[k]
    bits, g, strategy, sargs = cfg.block_quant(k)
    n_seq = x.shape[0]
    bs = settings.batch
    arch = adapters.of_layer(layer)
    names, input_of = arch.matrix_names, arch.inputs()

    # activation statistics of each linear group's input (on the block's actual inputs)
    sig = {c: None for c in COL_GROUPS}
    cnt = 0
    for sl in chunks(n_seq, bs):
        _, acts = block_forward(layer, x[sl], mask, collect=True)
        for c, a in acts.items():
            a2 = a.reshape(-1, a.shape[-1]).astype(mx.float32)
            s = a2.T @ a2
            sig[c] = s if sig[c] is None else sig[c] + s
        cnt += x[sl].shape[0] * x.shape[1]
        mx.eval(sig)
    sig = {c: v / cnt for c, v in sig.items()}

    # codes (fixed) and starting scales/biases
    codes, base = {}, {}
    for m in names:
        w = float_w[m].astype(mx.float32)
        key = f"b{k}.{m}.codes"
        strat, sa = strategy, sargs
        if settings.method == "stats" and key not in cfg.tensors:
            d = mx.diagonal(sig[input_of[m]])
            best = None
            for name, a in STATS_CANDIDATES:
                p = quant.compute_params(w, bits, g, name, act_sq=d if name == "search" else None, **a)
                c = quant.quantize_codes(w, p)
                e = weighted_error(w, quant.dequantize_codes(c, p.scales, p.biases, g), d)
                if best is None or e < best[0]:
                    best = (e, name, a)
            strat, sa = best[1], best[2]
        act = mx.diagonal(sig[input_of[m]]) if strat == "search" and sa.get("error") == "act" else None
        if settings.codes == "gptq":
            codes[m], s0, b0 = _gptq_matrix(w, sig[input_of[m]], bits, g, strat, sa, settings)
        else:
            p0 = quant.compute_params(w, bits, g, strat, act_sq=act, **sa)
            if key in cfg.tensors:
                codes[m] = quant.unpack_codes(cfg.tensors[key], bits, w.shape[1])
            else:
                codes[m] = quant.quantize_codes(w, p0)
            s0, b0 = p0.scales, p0.biases
        if settings.init == "closed_form" or settings.method == "stats":
            s0, b0 = weighted_lsq(w, codes[m], g, sig[input_of[m]], s0, b0)
        base[m] = (s0, b0)
        mx.eval(codes[m], s0, b0)
    rep_sb = []
    for i, r in enumerate(spec.replica):
        if i == 0:
            rep_sb.append(base)
            continue
        d = {}
        for m in names:
            s0, b0 = base[m]
            d[m] = replica_init(r, float_w[m].astype(mx.float32), codes[m], s0, b0, bits, g) \
                if r.init != "lsq" else weighted_lsq(float_w[m].astype(mx.float32), codes[m], g,
                                                     sig[input_of[m]], s0, b0)
        rep_sb.append(d)
    latent0 = None
    if settings.method == "ap":
        latent0 = {}
        for m in names:
            s0, b0 = base[m]
            w = float_w[m].astype(mx.float32).reshape(s0.shape[0], -1, g)
            q = codes[m].astype(mx.float32).reshape(w.shape)
            safe = mx.where(s0 == 0, 1.0, s0)[..., None]
            r = mx.where(s0[..., None] == 0, 0.0, (w - (s0[..., None] * q + b0[..., None])) / safe)
            latent0[m] = q + mx.clip(r, -0.49, 0.49)
            mx.eval(latent0[m])
    prob = _BlockProblem(loaded.model.args, layer, spec, bits, g, codes, base, rep_sb, settings,
                         shape=model_shape(loaded.config), latent0=latent0)

    def full_loss(P):
        tot = 0.0
        for sl in chunks(n_seq, bs):
            d = prob.forward(P, x[sl], mask) - y[sl]
            tot += float(mx.sum(d * d).item())
        return tot / (y.size)

    # the starting point: the block as configured before this run (round-to-nearest, K = 1
    # equivalent gains)
    P_rtn = prob.init_params()
    rtn_sb = []
    for i, r in enumerate(spec.replica):
        rtn_sb.append(prob.base[i])
    loss_before = _loss_of_start(prob, loaded, cfg, k, float_w, codes, x, y, mask, bs, strategy, sargs, bits, g)
    P = P_rtn
    curve = []
    steps = 0
    if settings.method == "stats":
        P = _stats_gains(prob, P, x, y, mask, bs)
    elif settings.method == "grid":
        P = _grid(prob, P, x, y, mask, bs, full_loss, float_w, codes, bits, g, cancel)
    if settings.method in ("adam", "ap") and settings.steps > 0:
        import mlx.optimizers as optim

        # hold out some sequences: the best step is chosen on them (early stopping), which
        # keeps a few hundred noisy steps from over-fitting the calibration text
        n_hold = int(round(n_seq * settings.holdout)) if n_seq >= 4 else 0
        perm = rng.permutation(n_seq)
        hold_idx = np.sort(perm[:n_hold])
        train_idx = np.sort(perm[n_hold:])
        xh = x[mx.array(hold_idx)] if n_hold else None
        yh = y[mx.array(hold_idx)] if n_hold else None

        def hold_loss(Q):
            if not n_hold:
                return None
            tot = 0.0
            for sl in chunks(n_hold, bs):
                d = prob.forward(Q, xh[sl], mask) - yh[sl]
                tot += float(mx.sum(d * d).item())
            return tot / yh.size

        opt = optim.Adam(learning_rate=settings.lr)
        train = {k2: P[k2] for k2 in ("rep", "gains", "beta", "lat") if k2 in P}
        best_P, best_h = train, hold_loss(train)
        every = max(5, settings.steps // 6)

        y_scale = 1.0 / max(float(mx.mean(y * y).item()), 1e-12)
        P0 = train

        def loss_fn(T, xb, yb):
            d = prob.forward(T, xb, mask) - yb
            L = mx.mean(d * d) * y_scale  # relative error: the same scale in every block
            if settings.reg > 0:
                from mlx.utils import tree_flatten

                pen = [mx.sum((a - b) ** 2) for (_, a), (_, b) in
                       zip(tree_flatten(T["rep"]), tree_flatten(P0["rep"]))]
                n = sum(a.size for _, a in tree_flatten(T["rep"]))
                L = L + settings.reg * sum(pen) / n
            return L

        vg = mx.value_and_grad(loss_fn)
        gmask = mx.array([0.0] + [1.0] * (spec.replicas - 1)) if prob.mode == "serial" else None
        for step in range(settings.steps):
            cancel.check()
            idx = mx.array(np.sort(rng.choice(train_idx, size=min(bs, len(train_idx)), replace=False)))
            loss, grads = vg(train, x[idx], y[idx])
            if gmask is not None:
                grads["gains"] = grads["gains"] * gmask
            elif spec.replicas == 1:
                grads["gains"] = mx.zeros_like(grads["gains"])
            if not settings.residual_gain:
                grads["beta"] = mx.zeros_like(grads["beta"])
            train = opt.apply_gradients(grads, train)
            mx.eval(train, opt.state, loss)
            lv = float(loss.item()) / y_scale
            curve.append(lv)
            steps += 1
            if on_loss:
                on_loss(k, step, lv)
            if n_hold and ((step + 1) % every == 0 or step == settings.steps - 1):
                h = hold_loss(train)
                if h < best_h:
                    best_P, best_h = train, h
            if step % 5 == 0 or step == settings.steps - 1:
                progress((k + (step + 1) / settings.steps) / n_blocks,
                         f"block {k}: step {step + 1}/{settings.steps} loss {lv:.4g}")
        P = best_P if n_hold else train
    loss_after = full_loss(P)
    accepted = loss_after < loss_before
    t, gains, beta = prob.export(P, k)
    if "lat" in P:
        codes = prob.final_codes(P)
    for m in names:
        t[f"b{k}.{m}.codes"] = quant.pack_codes(codes[m], bits)
    res = BlockResult(k, loss_before, loss_after if accepted else loss_before, accepted,
                      time.perf_counter() - t0, steps, settings.method, curve)
    if accepted:
        res.loss_after = loss_after
    return res, t, gains, beta


def _gptq_matrix(w, sigma, bits, g, strategy, sargs, settings):
    """GPTQ codes and their group scales/biases for one matrix, from its input second moment
    ``sigma`` (measured on the quantized model's inputs to this block)."""
    from dupstudio.core.calibration.gptq import gptq_codes

    if strategy == "search" and sargs.get("error") == "act":
        # the activation-weighted search needs the whole row's statistics; GPTQ already weighs
        # the error by the inputs, so its groups use the plain range
        strategy, sargs = "minmax", {}
    c, s, b = gptq_codes(np.array(w, dtype=np.float64), np.array(sigma, dtype=np.float64), bits, g,
                         strategy=strategy, strategy_args=sargs, damp=settings.gptq_damp,
                         act_order=settings.gptq_act_order)
    return mx.array(c), mx.array(s), mx.array(b)


def _loss_of_start(prob, loaded, cfg, k, float_w, codes, x, y, mask, bs, strategy, sargs, bits, g):
    """Block loss of the configuration as it stands (what the guard must not make worse)."""
    from dupstudio.core.replicate import ReplicatedBlock, block_tensors, make_replica_block

    bt = block_tensors(loaded, cfg, k, float_weights=float_w)
    spec = cfg.blocks[k]
    reps = [make_replica_block(loaded.model.args, bt, i, "simulate", mx.float32) for i in range(spec.replicas)]
    if cfg.blocks[k].calibration is None and spec.replicas > 1:
        # uncalibrated replicas are compared from the K = 1 starting point too: calibration starts
        # a replica at α = 0, so a calibrated block never ends worse than plain K = 1
        gains = [1.0] + [0.0] * (spec.replicas - 1)
        blk = ReplicatedBlock(reps, spec.mode, gains, spec.residual_gain)
        blk_cfg = ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
        l1 = _block_loss(blk, x, y, mask, bs)
        l2 = _block_loss(blk_cfg, x, y, mask, bs)
        return min(l1, l2)
    blk = ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
    return _block_loss(blk, x, y, mask, bs)


def _block_loss(blk, x, y, mask, bs):
    tot = 0.0
    for sl in chunks(x.shape[0], bs):
        d = blk(x[sl], mask) - y[sl]
        tot += float(mx.sum(d * d).item())
    return tot / y.size


def _stats_gains(prob, P, x, y, mask, bs):
    """Least-squares α (serial, one replica at a time) or w (parallel, jointly) on the block output."""
    if prob.K == 1:
        return P
    K = prob.K
    Ws = [prob.weights(P, i) for i in range(K)]

    def f(i, inp):
        _set_block_weights(prob.tmpl, *Ws[i])
        return block_forward(prob.tmpl, inp, mask)

    gains = [1.0] * K
    if prob.mode == "parallel":
        A = np.zeros((K, K))
        bvec = np.zeros(K)
        for sl in chunks(x.shape[0], bs):
            D = [(f(i, x[sl]) - x[sl]).reshape(-1) for i in range(K)]
            r = (y[sl] - x[sl]).reshape(-1)
            for i in range(K):
                bvec[i] += float((D[i] * r).sum().item())
                for j in range(K):
                    A[i, j] += float((D[i] * D[j]).sum().item())
        try:
            gains = list(np.linalg.solve(A + 1e-6 * np.trace(A) * np.eye(K), bvec))
        except np.linalg.LinAlgError:
            gains = [1.0] + [0.0] * (K - 1)
    else:
        cur = [mx.concatenate([f(0, x[sl]) for sl in chunks(x.shape[0], bs)])]
        yc = cur[0]
        for i in range(1, K):
            z = mx.concatenate([f(i, yc[sl]) for sl in chunks(x.shape[0], bs)])
            dz = (z - yc).reshape(-1)
            r = (y - yc).reshape(-1)
            den = float((dz * dz).sum().item())
            a = float((dz * r).sum().item()) / den if den > 0 else 0.0
            gains[i] = a
            yc = yc + a * (z - yc)
            mx.eval(yc)
    P = dict(P)
    P["gains"] = mx.array(gains, dtype=mx.float32)
    return P


GRID = {"gamma": (0.85, 1.0, 1.15), "offset": (-0.25, 0.0, 0.25), "alpha": (0.0, 0.25, 0.5, 0.75, 1.0)}


def _grid(prob, P, x, y, mask, bs, full_loss, float_w, codes, bits, g, cancel):
    """Grid over replica γ and grid offset (applied to all matrices of replicas ≥ 2) and α/w."""
    best = (full_loss(P), P)
    if prob.K == 1:
        for beta in (0.8, 0.9, 1.0, 1.1):
            Q = dict(P)
            Q["beta"] = mx.array(beta)
            L = full_loss(Q)
            if L < best[0]:
                best = (L, Q)
        return best[1]
    base = [dict(prob.base[i]) for i in range(prob.K)]
    for gam in GRID["gamma"]:
        for off in GRID["offset"]:
            cancel.check()
            for i in range(1, prob.K):
                for m in prob.names:
                    s0, b0 = base[0][m]
                    centre = b0 + s0 * ((2 ** bits - 1) / 2.0)
                    s = gam * s0
                    prob.base[i][m] = (s, centre - s * ((2 ** bits - 1) / 2.0) + off * s0)
            for a in GRID["alpha"]:
                Q = dict(P)
                if prob.mode == "serial":
                    Q["gains"] = mx.array([1.0] + [a] * (prob.K - 1))
                else:
                    Q["gains"] = mx.array([1.0 - a * (prob.K - 1) / prob.K] + [a / prob.K] * (prob.K - 1))
                L = full_loss(Q)
                if L < best[0]:
                    best = (L, Q, [dict(b) for b in prob.base])
    if len(best) == 3:
        prob.base = best[2]
    else:
        prob.base = base
    return best[1]


def configured_block(loaded, cfg, k):
    """Block k of configuration ``cfg`` as the quantized model runs it (simulate, float32): what
    the next block's inputs pass through when calibrating incrementally."""
    from dupstudio.core.replicate import ReplicatedBlock, block_tensors, make_replica_block

    bt = block_tensors(loaded, cfg, k)
    spec = cfg.blocks[k]
    reps = [make_replica_block(loaded.model.args, bt, i, "simulate", mx.float32) for i in range(spec.replicas)]
    return ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
