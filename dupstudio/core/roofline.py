"""Roofline model of one configuration: bytes, FLOPs and layer passes per decode token and per
prefill, and a predicted latency on a hardware profile.

Pure Python (no MLX): a configuration is a model *shape* (as :func:`dupstudio.core.model_io.model_shape`
returns, or :func:`shape_from_hf_config`, or a preset in :data:`SHAPE_PRESETS`), one
:class:`BlockPlan` per decoder block, and an :class:`EmbedPlan` for the embedding (and head).

Prediction, per phase (decode one token at ``context``; prefill ``prefill_tokens``)::

    bandwidth_ms = quantized_bytes / (f_q * BW) + other_bytes / (f_16 * BW)
    compute_ms   = sum over paths of FLOPs / peak(path)
    predicted_ms = max(bandwidth_ms, compute_ms) + passes * layer_floor [+ extra rows * layer_row]

(``predicted_per_component_ms`` takes the max per component, each block and the embedding/head,
and sums: the better figure where bandwidth-bound and compute-bound kernels take turns without
overlapping, as on the CPU backend.)

``f_q`` / ``f_16`` are the profile's achievable-bandwidth fractions for quantized weights and for
everything else (float weights, KV cache, norms; in prefill ``prefill_float_bandwidth_fraction``
where the profile has one); ``peak(path)`` is the quantized-matmul throughput for quantized
matrices (deploy mode runs ``quantized_matmul``; the phase's figure, one-row decode or many-row
prefill, where the profile has ``quantized_matmul_tflops_by_phase``) and the float peak of the
profile's compute dtype otherwise (attention, float blocks). ``passes`` counts decoder-layer passes,
every replica pass included; the floor is per layer pass (it was derived that way). Where the profile
has ``layer_row_us`` (a measured machine profile), a prefill chunk of ``c`` rows also costs
``(c - 1) x layer_row_us`` per layer pass: the non-matmul work that grows with the rows.

Replica passes (K > 1) re-run one block over the same packed codes; each replica reads its own
parameters (by default a full set of fp16 per-group scales and biases) and its own KV cache. Three
assumptions for the shared codes of the extra passes:

* ``cache``: re-read from the last-level cache, no DRAM bytes;
* ``dram``: re-read from DRAM: K x the block's weight bytes (with full per-replica scales);
* ``measured``: a fraction ``r`` of the shared bytes per extra pass, ``r`` from the machine
  micro-benchmark (:mod:`dupstudio.core.machine_profile`) or the profile's default for a block that
  fits (``second_pass_ratio_in_cache``) or does not fit (``second_pass_ratio_spill``) the cache.

Not modelled: activations traffic (small at decode; matters for long prefills), elementwise FLOPs
(norms, RoPE, SiLU, softmax), sampling, Python overhead outside the per-layer floor -- except as
far as the measured floor and row terms hold them.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from dupstudio.core.jobs import DupstudioError

ASSUMPTIONS = ("cache", "dram", "measured")
PHASES = ("decode", "prefill")
MODES = ("serial", "parallel")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = (16, 32)
GROUP_SIZES = (32, 64, 128)
SCALE_BIAS_BYTES = 4  # one fp16 scale + one fp16 bias per group (as stored)
NORM_BYTES = 2  # RMSNorm weights stored as fp16
MIB = 1 << 20

# Figures every profile carries (each {value, source, estimate} in JSON).
PROFILE_FIGURES = (
    "bandwidth_gbs",
    "fp32_tflops",
    "fp16_tflops",
    "quantized_matmul_tflops",
    "cache_mb",
    "achievable_bandwidth_fraction",
    "achievable_bandwidth_fraction_fp16",
    "layer_floor_us",
    "second_pass_ratio_in_cache",
    "second_pass_ratio_spill",
)
MACHINE_PROFILE_NAMES = ("machine", "this-machine")


# --------------------------------------------------------------------------- profiles
@dataclass
class HardwareProfile:
    """One machine's figures. Units: GB/s (1e9 B/s), TFLOPS (1e12 FLOP/s), MiB, microseconds."""

    name: str
    label: str
    bandwidth_gbs: float
    fp32_tflops: float
    fp16_tflops: float
    quantized_matmul_tflops: float
    cache_mb: float
    achievable_bandwidth_fraction: float
    achievable_bandwidth_fraction_fp16: float
    layer_floor_us: float
    second_pass_ratio_in_cache: float
    second_pass_ratio_spill: float
    compute_dtype: str = "float16"
    kind: str = ""
    cache_name: str = "LLC"
    # optional per-bits quantized throughput (TFLOPS), e.g. measured at 2 and 4 bits
    quantized_matmul_tflops_by_bits: dict = field(default_factory=dict)
    # optional per-phase, per-bits quantized throughput: {"decode": {bits: TFLOPS}, "prefill": {...}}
    # (decode runs one-row products, prefill many-row ones; on the CPU backend their rates differ)
    quantized_matmul_tflops_by_phase: dict = field(default_factory=dict)
    # optional: the float weights' bandwidth fraction in prefill (many-row GEMMs), where it differs from
    # the decode GEMV's (``achievable_bandwidth_fraction_fp16``); measured on the CPU backend, where a
    # GEMM with few rows is bound by packing its weights
    prefill_float_bandwidth_fraction: Optional[float] = None
    # optional: per-layer-pass cost of every token row beyond the first (norms, RoPE, attention,
    # activations of a prefill chunk), microseconds; ``layer_floor_us`` is the cost of a one-row pass
    layer_row_us: float = 0.0
    # optional per-phase float matmul throughput (TFLOPS), e.g. {"prefill": GEMM rate at the model's block
    # shapes with many rows}; default: the float peak of the compute dtype
    float_matmul_tflops_by_phase: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # figure -> {"source", "estimate"[, "note"]}
    meta: dict = field(default_factory=dict)  # measured profiles: date, MLX version, backend, ...

    # ---- derived
    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9

    @property
    def cache_bytes(self) -> float:
        return self.cache_mb * MIB

    @property
    def layer_floor_s(self) -> float:
        return self.layer_floor_us * 1e-6

    @property
    def float_tflops(self) -> float:
        """Peak of the float path in the profile's compute dtype."""
        return self.fp32_tflops if self.compute_dtype == "float32" else self.fp16_tflops

    def float_tflops_for(self, phase: Optional[str] = None) -> float:
        """Float matmul peak of ``phase`` where the profile has one, else :attr:`float_tflops`."""
        v = (self.float_matmul_tflops_by_phase or {}).get(phase) if phase else None
        return float(v) if v else self.float_tflops

    def quantized_tflops(self, bits: int, phase: Optional[str] = None) -> float:
        """Quantized-matmul peak at ``bits``; ``phase`` "decode" (one row) or "prefill" (many rows)
        picks the phase's measured figure where the profile has one."""
        if phase:
            ph = (self.quantized_matmul_tflops_by_phase or {}).get(phase) or {}
            v = ph.get(bits, ph.get(str(bits)))
            if v:
                return float(v)
        by = self.quantized_matmul_tflops_by_bits or {}
        v = by.get(bits, by.get(str(bits)))
        return float(v) if v else self.quantized_matmul_tflops

    def is_estimate(self, figure: str) -> bool:
        return bool(self.sources.get(figure, {}).get("estimate", True))

    # ---- JSON
    @classmethod
    def from_json(cls, name: str, d: dict) -> "HardwareProfile":
        problems = validate_profile(name, d)
        if problems:
            raise DupstudioError("hardware profile " + "; ".join(problems))
        kw: dict[str, Any] = {}
        sources = {}
        for f in PROFILE_FIGURES:
            fig = d[f]
            kw[f] = float(fig["value"])
            sources[f] = {k: v for k, v in fig.items() if k != "value"}
        by_bits = {}
        for k, fig in (d.get("quantized_matmul_tflops_by_bits") or {}).items():
            by_bits[int(k)] = float(fig["value"] if isinstance(fig, dict) else fig)
        by_phase = {}
        for ph, figs in (d.get("quantized_matmul_tflops_by_phase") or {}).items():
            if isinstance(figs, dict):
                by_phase[str(ph)] = {int(k): float(v["value"] if isinstance(v, dict) else v)
                                     for k, v in figs.items()}
        return cls(name=name, label=d.get("label", name), compute_dtype=d.get("compute_dtype", "float16"),
                   kind=d.get("kind", ""), cache_name=d.get("cache_name", "LLC"),
                   quantized_matmul_tflops_by_bits=by_bits, quantized_matmul_tflops_by_phase=by_phase,
                   prefill_float_bandwidth_fraction=_opt_value(d.get("prefill_float_bandwidth_fraction")),
                   layer_row_us=_opt_value(d.get("layer_row_us")) or 0.0,
                   float_matmul_tflops_by_phase={str(k): float(v["value"] if isinstance(v, dict) else v)
                                                 for k, v in (d.get("float_matmul_tflops_by_phase") or {}).items()},
                   sources=sources,
                   meta=dict(d.get("meta") or {}), **kw)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"label": self.label, "kind": self.kind, "compute_dtype": self.compute_dtype,
                               "cache_name": self.cache_name}
        for f in PROFILE_FIGURES:
            src = self.sources.get(f, {"source": "unknown", "estimate": True})
            out[f] = {"value": getattr(self, f), **src}
        if self.quantized_matmul_tflops_by_bits:
            out["quantized_matmul_tflops_by_bits"] = {
                str(k): v for k, v in self.quantized_matmul_tflops_by_bits.items()}
        if self.quantized_matmul_tflops_by_phase:
            out["quantized_matmul_tflops_by_phase"] = {
                ph: {str(k): v for k, v in figs.items()}
                for ph, figs in self.quantized_matmul_tflops_by_phase.items()}
        if self.prefill_float_bandwidth_fraction is not None:
            out["prefill_float_bandwidth_fraction"] = self.prefill_float_bandwidth_fraction
        if self.layer_row_us:
            out["layer_row_us"] = self.layer_row_us
        if self.float_matmul_tflops_by_phase:
            out["float_matmul_tflops_by_phase"] = dict(self.float_matmul_tflops_by_phase)
        if self.meta:
            out["meta"] = self.meta
        return out


def _opt_value(v) -> Optional[float]:
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def validate_profile(name: str, d: dict) -> list[str]:
    """Problems with one profile dict (empty list: valid)."""
    problems = []
    if not isinstance(d, dict):
        return [f"{name}: not an object"]
    for f in PROFILE_FIGURES:
        fig = d.get(f)
        if not isinstance(fig, dict) or "value" not in fig:
            problems.append(f"{name}.{f}: missing (expected {{value, source, estimate}})")
            continue
        if not isinstance(fig["value"], (int, float)) or isinstance(fig["value"], bool) \
                or not math.isfinite(fig["value"]) or fig["value"] < 0:
            problems.append(f"{name}.{f}: value must be a non-negative number")
        if not str(fig.get("source") or "").strip():
            problems.append(f"{name}.{f}: no source")
        if not isinstance(fig.get("estimate"), bool):
            problems.append(f"{name}.{f}: 'estimate' must be true or false")
    for f in ("achievable_bandwidth_fraction", "achievable_bandwidth_fraction_fp16",
              "second_pass_ratio_in_cache", "second_pass_ratio_spill"):
        v = (d.get(f) or {}).get("value")
        if isinstance(v, (int, float)) and not 0 <= v <= 1:
            problems.append(f"{name}.{f}: must lie in [0, 1]")
    for f in ("bandwidth_gbs", "fp32_tflops", "fp16_tflops", "quantized_matmul_tflops"):
        v = (d.get(f) or {}).get("value")
        if isinstance(v, (int, float)) and v <= 0:
            problems.append(f"{name}.{f}: must be positive")
    if d.get("compute_dtype", "float16") not in ("float16", "float32", "bfloat16"):
        problems.append(f"{name}.compute_dtype: float16, bfloat16 or float32")
    return problems


def validate_profiles_doc(doc: dict) -> list[str]:
    problems = []
    profiles = doc.get("profiles") if isinstance(doc, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        return ["no 'profiles' object"]
    if doc.get("default") not in profiles:
        problems.append(f"default profile {doc.get('default')!r} is not among the profiles")
    for name, d in profiles.items():
        problems += validate_profile(name, d)
    return problems


def profiles_path() -> Path:
    """``$DUPSTUDIO_HARDWARE_PROFILES``, else ``resources/hardware_profiles.json`` beside the package
    (source checkout) or inside a frozen bundle."""
    env = os.environ.get("DUPSTUDIO_HARDWARE_PROFILES")
    if env:
        return Path(env).expanduser()
    try:  # the project's resource locator (checkout, package data, frozen bundle)
        from dupstudio.resources_path import resource

        found = resource("hardware_profiles.json")
        if found.exists():
            return found
    except ImportError:  # pragma: no cover - older trees
        pass
    candidates = [Path(__file__).resolve().parents[2] / "resources" / "hardware_profiles.json"]
    if getattr(sys, "_MEIPASS", None):
        candidates.insert(0, Path(sys._MEIPASS) / "resources" / "hardware_profiles.json")
    for c in candidates:
        if c.exists():
            return c
    return candidates[-1]


def load_profiles_doc(path: Optional[Path] = None) -> dict:
    path = Path(path) if path else profiles_path()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DupstudioError(f"{path}: hardware profiles file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DupstudioError(f"{path}: malformed hardware profiles ({e})") from e
    problems = validate_profiles_doc(doc)
    if problems:
        raise DupstudioError(f"{path}: " + "; ".join(problems))
    return doc


def load_profiles(path: Optional[Path] = None) -> dict[str, HardwareProfile]:
    doc = load_profiles_doc(path)
    return {name: HardwareProfile.from_json(name, d) for name, d in doc["profiles"].items()}


def default_profile_name(path: Optional[Path] = None) -> str:
    return load_profiles_doc(path)["default"]


#: where the measured profile of this machine is cached (written by machine_profile.save)
PROFILE_FILE = "machine_profile.json"


def profile_path() -> Path:
    from dupstudio.core.model_io import dupstudio_home

    return dupstudio_home() / PROFILE_FILE


def load_cached(path: Optional[Path] = None) -> Optional[HardwareProfile]:
    """The cached measured profile, or None (absent or unreadable)."""
    path = Path(path) if path else profile_path()
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        return HardwareProfile.from_json(doc.get("name", "machine"), doc)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, DupstudioError, KeyError, TypeError, ValueError):
        return None


def get_profile(name: Optional[str] = None, path: Optional[Path] = None) -> HardwareProfile:
    """A named profile (None: the file's default, Apple M1 Pro). ``machine`` / ``this-machine``:
    the cached measured profile (measure it first with ``machine_profile.load_or_measure``).
    Names resolve as :func:`resolve_profile_name` says (``m1-pro`` = ``apple-m1-pro``)."""
    if name is not None and str(name).strip().lower().replace(" ", "-") in MACHINE_PROFILE_NAMES:
        prof = load_cached()
        if prof is None:
            raise DupstudioError("this machine has no measured profile yet: run the machine "
                                 "micro-benchmark (machine_profile.load_or_measure)")
        return prof
    doc = load_profiles_doc(path)
    name = resolve_profile_name(name or doc["default"], doc)
    return HardwareProfile.from_json(name, doc["profiles"][name])


def resolve_profile_name(name: str, doc: Optional[dict] = None) -> str:
    """The profile key ``name`` means: exact, case-insensitive, or without the vendor prefix
    (``m1-pro`` = ``apple-m1-pro``, ``h100-sxm`` = ``nvidia-h100-sxm``); ``machine`` stays itself.
    Raises DupstudioError listing the known names."""
    if name in MACHINE_PROFILE_NAMES:
        return name
    doc = doc or load_profiles_doc()
    profiles = doc["profiles"]
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key in MACHINE_PROFILE_NAMES:
        return key
    for cand in (key, f"apple-{key}", f"nvidia-{key}"):
        if cand in profiles:
            return cand
    raise DupstudioError(f"unknown hardware profile {name!r}; known: "
                         f"{', '.join(sorted(profiles))}, {MACHINE_PROFILE_NAMES[0]} "
                         f"(the vendor prefix may be left out, e.g. m1-pro)")


def _as_profile(profile: Union[HardwareProfile, str, None]) -> HardwareProfile:
    return profile if isinstance(profile, HardwareProfile) else get_profile(profile)


# --------------------------------------------------------------------------- shapes
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_blocks", "num_heads", "num_kv_heads", "head_dim",
              "vocab_size", "tied_embeddings")

SHAPE_PRESETS: dict[str, dict] = {
    # a 7B model of the same family, described by its config shapes alone (no weights needed)
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_blocks": 32, "num_heads": 32,
                   "num_kv_heads": 32, "head_dim": 128, "vocab_size": 32000, "tied_embeddings": False},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_blocks": 32, "num_heads": 32,
                   "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256, "tied_embeddings": False},
    # the default model
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_blocks": 30, "num_heads": 9,
                     "num_kv_heads": 3, "head_dim": 64, "vocab_size": 49152, "tied_embeddings": True},
}


def preset_shape(name: str) -> dict:
    key = name.lower()
    if key not in SHAPE_PRESETS:
        raise DupstudioError(f"unknown shape preset {name!r}; known: {', '.join(SHAPE_PRESETS)}")
    return dict(SHAPE_PRESETS[key])


def shape_from_hf_config(config: dict) -> dict:
    """The model shape of a Hugging Face / mlx-lm ``config.json`` dict (llama family)."""
    from dupstudio.core.model_io import model_shape

    try:
        return check_shape(model_shape(config))
    except KeyError as e:
        raise DupstudioError(f"config.json lacks {e.args[0]!r}: cannot describe the model's shape") from e
    except (TypeError, ValueError) as e:
        raise DupstudioError(f"config.json: malformed shape field ({e})") from e


def check_shape(shape: dict) -> dict:
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise DupstudioError(f"model shape lacks {', '.join(missing)}")
    out = {k: (bool(shape[k]) if k == "tied_embeddings" else int(shape[k])) for k in SHAPE_KEYS}
    for k in SHAPE_KEYS[:-1]:
        if out[k] <= 0:
            raise DupstudioError(f"model shape: {k} must be positive")
    if out["num_heads"] % out["num_kv_heads"]:
        raise DupstudioError("model shape: num_heads must be a multiple of num_kv_heads")
    return out


#: the linears of one llama block, in :func:`block_matrices` order
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_matrices(shape: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one llama block."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_heads"] * shape["head_dim"]
    kv = shape["num_kv_heads"] * shape["head_dim"]
    return dict(zip(BLOCK_LINEARS, ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))))


# --------------------------------------------------------------------------- plans
@dataclass
class BlockPlan:
    """How one decoder block is deployed.

    ``bits``: 16 (or 32) = float weights; 2-8 = affine quantized with one fp16 scale and bias per
    ``group_size`` weights. ``replicas``: K passes over the same codes (``mode`` serial or parallel;
    both run K passes). ``replica_param_values``: 16-bit values each additional replica stores for
    the whole block (may be fractional: an average over replicas that differ, see
    :func:`plans_from_config`); 0 = a full set of per-group scales and biases for every matrix (for
    float blocks: nothing). ``matrix_bits``: per-matrix bits overriding ``bits`` for the named
    linears (e.g. mlx-lm's mixed recipes keep some ``v_proj`` / ``down_proj`` at 6 bits); all at
    the block's ``group_size``."""

    bits: int = 16
    group_size: int = 64
    replicas: int = 1
    mode: str = "serial"
    replica_param_values: float = 0
    matrix_bits: Optional[dict] = None

    def bits_of(self, matrix: str) -> int:
        return int((self.matrix_bits or {}).get(matrix, self.bits))

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def check(self, shape: Optional[dict] = None, where: str = "block") -> "BlockPlan":
        if self.bits not in QUANT_BITS + FLOAT_BITS:
            raise DupstudioError(f"{where}: bits must be one of {QUANT_BITS + FLOAT_BITS}, not {self.bits}")
        if self.quantized and self.group_size not in GROUP_SIZES:
            raise DupstudioError(f"{where}: group size must be one of {GROUP_SIZES}")
        if int(self.replicas) < 1:
            raise DupstudioError(f"{where}: replicas must be >= 1")
        if self.mode not in MODES:
            raise DupstudioError(f"{where}: mode must be 'serial' or 'parallel'")
        if self.replica_param_values < 0:
            raise DupstudioError(f"{where}: replica_param_values must be >= 0")
        if self.matrix_bits:
            for name, b in self.matrix_bits.items():
                if name not in BLOCK_LINEARS:
                    raise DupstudioError(f"{where}: matrix_bits names an unknown linear {name!r}")
                if int(b) not in QUANT_BITS or not self.quantized:
                    raise DupstudioError(f"{where}: matrix_bits must be quantized bits {QUANT_BITS} "
                                         f"of a quantized block ({name}: {b})")
        if shape is not None and self.quantized:
            for name, (_, n_in) in block_matrices(shape).items():
                if n_in % self.group_size:
                    raise DupstudioError(
                        f"{where}: group size {self.group_size} does not divide {name}'s rows "
                        f"({n_in} wide); choose a group size that divides it")
        return self


@dataclass
class EmbedPlan:
    """The embedding (and, if tied, the head): 16 = float16, or 4/8 bits affine quantized."""

    bits: int = 16
    group_size: int = 64

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def check(self, hidden: int, where: str = "embedding") -> "EmbedPlan":
        if self.bits not in QUANT_BITS + FLOAT_BITS:
            raise DupstudioError(f"{where}: bits must be one of {QUANT_BITS + FLOAT_BITS}")
        if self.quantized and (self.group_size not in GROUP_SIZES or hidden % self.group_size):
            raise DupstudioError(f"{where}: group size {self.group_size} must divide the hidden size {hidden}")
        return self


def plans_from_config(cfg: Any, shape: dict, *, float_bits: int = 16,
                      as_built: bool = False) -> tuple[list["BlockPlan"], "EmbedPlan"]:
    """A configuration (:class:`dupstudio.core.config.Config`) as roofline plans, exactly.

    Per block: its bits and group size (defaults applied), K and mode, and
    ``replica_param_values`` = the 16-bit values the extra replicas store, per extra replica:

    * per-group scale + bias for every matrix (``group`` granularity): 2 x out x (in / group);
    * 2 per output row (``channel`` granularity: ``ch_scale`` and ``ch_offset``): 2 x out;
    * the vectors present in ``cfg.tensors`` for that replica: row gains (out per matrix) and
      the tied column gains (attn: hidden, mlp: hidden, o: kv_heads x head_dim, down: intermediate);
    * its gain (α for serial, w for parallel): 1.

    The total over the K - 1 extra replicas is exact; ``replica_param_values`` is that total / (K - 1)
    (a fraction when the replicas differ; the model multiplies it back by K - 1). The primary
    replica's own gains and the block's residual gain fold into its scales / norms at deployment and
    are not replica parameters.

    ``as_built``: count what ``replicate.build(..., "deploy")`` materialises instead of what the
    configuration stores: every replica holds a full set of fp16 per-group scales and biases (channel
    parameters, row and column gains fold into them; gains are Python scalars).

    The embedding plan: ``cfg.embedding.bits`` (None: float at ``float_bits``, 16 for the float16
    deployment of the published profiles, 32 for the CPU backend's float32)."""
    shape = check_shape(shape)
    mats = block_matrices(shape)
    col_len = {"attn": shape["hidden_size"], "mlp": shape["hidden_size"],
               "o": shape["num_kv_heads"] * shape["head_dim"], "down": shape["intermediate_size"]}
    tensors = getattr(cfg, "tensors", None) or {}
    if len(cfg.blocks) != shape["num_blocks"]:
        raise DupstudioError(f"the configuration has {len(cfg.blocks)} blocks, the model {shape['num_blocks']}")
    plans = []
    for k, b in enumerate(cfg.blocks):
        bits, g = cfg.block_quant(k)[:2]
        K = int(b.replicas)
        full = sum(2 * o * (i // g) for o, i in mats.values())
        total = 0
        for i in range(1, K):
            if as_built:
                total += full
                continue
            r = b.replica[i]
            total += full if r.granularity == "group" else sum(2 * o for o, _ in mats.values())
            total += sum(o for m, (o, _) in mats.items() if f"b{k}.r{i}.{m}.row_gain" in tensors)
            total += sum(n for c, n in col_len.items() if f"b{k}.r{i}.col.{c}" in tensors)
            total += 1  # α_i or w_i
        values = 0 if K == 1 else (total // (K - 1) if total % (K - 1) == 0 else total / (K - 1))
        plans.append(BlockPlan(bits=int(bits), group_size=int(g), replicas=K, mode=b.mode,
                               replica_param_values=values))
    e = cfg.embedding
    embed = EmbedPlan(bits=int(e.bits) if e.bits is not None else int(float_bits), group_size=int(e.group_size))
    return plans, embed


def uniform_plan(shape: dict, bits: int = 16, group_size: int = 64, replicas: int = 1,
                 mode: str = "serial", replica_param_values: int = 0) -> list[BlockPlan]:
    return [BlockPlan(bits, group_size, replicas, mode, replica_param_values)
            for _ in range(shape["num_blocks"])]


def matrix_bytes(n_params: int, bits: int, group_size: int) -> tuple[float, float]:
    """(code bytes, scale+bias bytes) of ``n_params`` weights stored at ``bits``."""
    if bits >= 16:
        return n_params * bits / 8, 0.0
    return n_params * bits / 8, (n_params // group_size) * SCALE_BIAS_BYTES


# --------------------------------------------------------------------------- results
@dataclass
class Estimate:
    """One phase under one cache assumption."""

    phase: str
    assumption: str
    tokens: int
    bytes: float
    quantized_bytes: float  # part of ``bytes`` streamed at the quantized-path bandwidth fraction
    flops: float
    passes: int
    bandwidth_ms: float
    compute_ms: float
    overhead_ms: float
    predicted_ms: float
    predicted_no_floor_ms: float
    # sum over components (each block, embedding, head) of max(bandwidth, compute), plus the floor:
    # closer where bandwidth-bound and compute-bound kernels alternate without overlapping (CPU)
    predicted_per_component_ms: float
    bound: str  # "bandwidth" or "compute" (which term of the max wins)

    @property
    def intensity(self) -> float:
        """FLOPs per DRAM byte."""
        return self.flops / self.bytes if self.bytes else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * 1e3 / self.predicted_ms if self.predicted_ms else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["intensity"] = self.intensity
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclass
class BlockBreakdown:
    """One decoder block, per decode token (all K passes)."""

    index: int
    bits: int
    group_size: int
    replicas: int
    mode: str
    linear_params: int
    code_bytes: float  # packed codes (or float weights)
    scale_bias_bytes: float  # the first replica's fp16 scales and biases
    norm_bytes: float
    weight_bytes: float  # codes + scales/biases + norms: one pass's weights
    replica_param_bytes: float  # all extra replicas' own parameters
    working_set_bytes: float  # weight_bytes + replica_param_bytes
    fits_in_cache: bool
    cache_fraction: float  # working set / last-level cache
    second_pass_ratio: float  # r used by the "measured" assumption
    kv_read_bytes: float
    kv_write_bytes: float
    flops: float
    passes: int
    dram_bytes: dict  # assumption -> weight + replica-parameter + KV bytes from DRAM

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RooflineResult:
    label: str
    profile: str
    shape: dict
    context: int
    prefill_tokens: int
    plans: list  # BlockPlan dicts
    embed: dict
    head: dict
    decode: dict  # assumption -> Estimate
    prefill: dict  # assumption -> Estimate
    blocks: list  # BlockBreakdown
    components: dict  # decode bytes per component (block weights per assumption)
    bits_per_weight: float  # decoder-block linears incl. all replica parameters
    storage_bytes: dict  # deploy memory: block linears (+replica params), norms, embedding, head, total
    notes: list = field(default_factory=list)

    @property
    def bytes(self) -> dict:
        return {p: {a: getattr(self, p)[a].bytes for a in ASSUMPTIONS} for p in PHASES}

    @property
    def flops(self) -> dict:
        return {p: getattr(self, p)["dram"].flops for p in PHASES}

    @property
    def passes(self) -> dict:
        return {p: getattr(self, p)["dram"].passes for p in PHASES}

    @property
    def fits_in_cache(self) -> list[bool]:
        return [b.fits_in_cache for b in self.blocks]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "profile": self.profile,
            "shape": self.shape,
            "context": self.context,
            "prefill_tokens": self.prefill_tokens,
            "plans": self.plans,
            "embed": self.embed,
            "head": self.head,
            "decode": {a: e.to_dict() for a, e in self.decode.items()},
            "prefill": {a: e.to_dict() for a, e in self.prefill.items()},
            "bytes": self.bytes,
            "flops": self.flops,
            "passes": self.passes,
            "fits_in_cache": self.fits_in_cache,
            "blocks": [b.to_dict() for b in self.blocks],
            "components": self.components,
            "bits_per_weight": self.bits_per_weight,
            "storage_bytes": self.storage_bytes,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- the model
RatioArg = Union[None, float, Callable[[float], float]]


class _Phase:
    """Accumulates one phase under one assumption, component by component."""

    def __init__(self, prof: HardwareProfile, float_fraction: Optional[float] = None):
        self.prof = prof
        self.f16 = float_fraction or prof.achievable_bandwidth_fraction_fp16
        self.q = self.f = self.flops = 0.0
        self.bandwidth_s = self.compute_s = self.component_sum_s = 0.0

    def add(self, q_bytes: float = 0.0, f_bytes: float = 0.0, flops: Sequence[tuple[float, float]] = (),
            gemv: bool = False):
        """One component (a block's passes, the embedding, the head): bytes at the quantized and the
        float bandwidth fraction, and (peak TFLOPS, FLOPs) pairs. ``gemv``: the float bytes are read by
        one-row products (the head of the last prompt position) even in prefill."""
        bw = self.prof.bandwidth_bytes_per_s
        f16 = self.prof.achievable_bandwidth_fraction_fp16 if gemv else self.f16
        b_s = q_bytes / (self.prof.achievable_bandwidth_fraction * bw) + \
            f_bytes / (f16 * bw)
        c_s = sum(n / (peak * 1e12) for peak, n in flops if n)
        self.q += q_bytes
        self.f += f_bytes
        self.flops += sum(n for _, n in flops)
        self.bandwidth_s += b_s
        self.compute_s += c_s
        self.component_sum_s += max(b_s, c_s)

    def estimate(self, phase: str, assumption: str, tokens: int, passes: int, extra_rows: int = 0) -> "Estimate":
        overhead_s = passes * self.prof.layer_floor_s + extra_rows * self.prof.layer_row_us * 1e-6
        core = max(self.bandwidth_s, self.compute_s)
        return Estimate(phase=phase, assumption=assumption, tokens=tokens, bytes=self.q + self.f,
                        quantized_bytes=self.q, flops=self.flops, passes=passes,
                        bandwidth_ms=self.bandwidth_s * 1e3, compute_ms=self.compute_s * 1e3,
                        overhead_ms=overhead_s * 1e3, predicted_ms=(core + overhead_s) * 1e3,
                        predicted_no_floor_ms=core * 1e3,
                        predicted_per_component_ms=(self.component_sum_s + overhead_s) * 1e3,
                        bound="bandwidth" if self.bandwidth_s >= self.compute_s else "compute")


def predict(shape: dict, blocks: Union[Sequence[BlockPlan], BlockPlan, None] = None,
            profile: Union[HardwareProfile, str, None] = None, *,
            embed: Optional[EmbedPlan] = None, head: Optional[EmbedPlan] = None,
            context: int = 512, prefill_tokens: int = 512, prefill_chunk: int = 2048,
            prefill_logits: str = "last", kv_bytes: int = 2,
            second_pass_ratio: RatioArg = None, label: str = "") -> RooflineResult:
    """Bytes, FLOPs, passes and predicted latency of one configuration.

    ``blocks``: one :class:`BlockPlan` per decoder block (a single plan applies to all; None: float16).
    ``embed``: the embedding plan (default float16); ``head``: the untied head's plan (default: same
    as ``embed``; ignored when the embeddings are tied, the head then *is* the embedding matrix).
    ``context``: tokens already in the KV cache at the decode step (the step attends to context + 1).
    ``prefill_tokens``: prompt length P, from an empty cache, in chunks of ``prefill_chunk`` (mlx-lm's
    prefill step); ``prefill_logits``: "last" (the head runs on the last position) or "all".
    ``kv_bytes``: bytes per KV element (2 = float16). ``second_pass_ratio``: r for the "measured"
    assumption, a number or a function of the block's working-set bytes (None: the profile's
    in-cache / spill default by whether the block fits the last-level cache)."""
    shape = check_shape(shape)
    prof = _as_profile(profile)
    nb = shape["num_blocks"]
    if blocks is None:
        plans = uniform_plan(shape)
    elif isinstance(blocks, BlockPlan):
        plans = [blocks] * nb
    else:
        plans = list(blocks)
    if len(plans) != nb:
        raise DupstudioError(f"{len(plans)} block plans for a model with {nb} blocks")
    for k, p in enumerate(plans):
        p.check(shape, f"block {k}")
    embed = (embed or EmbedPlan()).check(shape["hidden_size"])
    head_plan = embed if shape["tied_embeddings"] else (head or embed).check(shape["hidden_size"], "head")
    if context < 0 or prefill_tokens < 0 or prefill_chunk < 1:
        raise DupstudioError("context and prefill_tokens must be >= 0, prefill_chunk >= 1")
    if prefill_logits not in ("last", "all"):
        raise DupstudioError("prefill_logits: 'last' or 'all'")

    h, V = shape["hidden_size"], shape["vocab_size"]
    H, kvh, hd = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    mats = block_matrices(shape)
    n_lin = sum(o * i for o, i in mats.values())
    float_peak = prof.float_tflops
    float_peak_pre = prof.float_tflops_for("prefill")
    kv_row = 2 * kvh * hd * kv_bytes  # K and V of one position, one pass
    P = int(prefill_tokens)
    chunks = max(1, math.ceil(P / prefill_chunk)) if P else 0
    chunk_ends = [min(P, (j + 1) * prefill_chunk) for j in range(chunks)]

    acc = {(ph, a): _Phase(prof, prof.prefill_float_bandwidth_fraction if ph == "prefill" else None)
           for ph in PHASES for a in ASSUMPTIONS}
    passes = {ph: 0 for ph in PHASES}
    extra_rows = {ph: 0 for ph in PHASES}  # token rows beyond the first of every layer pass
    comp = {"block_weights": {a: 0.0 for a in ASSUMPTIONS}, "replica_params": 0.0, "kv_read": 0.0,
            "kv_write": 0.0, "embedding": 0.0, "head": 0.0, "final_norm": 0.0}
    breakdown = []
    storage_linear = storage_norms = 0.0
    linear_values = 0

    for k, p in enumerate(plans):
        K = int(p.replicas)
        by_bits: dict = {}  # linear weights per bit width (one entry unless matrix_bits)
        for m, (o, i) in mats.items():
            by_bits[p.bits_of(m)] = by_bits.get(p.bits_of(m), 0) + o * i
        parts = sorted(by_bits.items())
        code_b = sum(matrix_bytes(n, b, p.group_size)[0] for b, n in parts)
        sb_b = sum(matrix_bytes(n, b, p.group_size)[1] for b, n in parts)
        norm_b = 2 * h * NORM_BYTES
        shared = code_b + norm_b
        weight_b = shared + sb_b
        if p.replica_param_values:
            r1 = 2.0 * p.replica_param_values
        else:
            r1 = sb_b  # a full set of fp16 scales + biases (0 for float blocks)
        rep_b = (K - 1) * r1
        working = weight_b + rep_b
        fits = working <= prof.cache_bytes
        if second_pass_ratio is None:
            r = prof.second_pass_ratio_in_cache if fits else prof.second_pass_ratio_spill
        elif callable(second_pass_ratio):
            r = float(second_pass_ratio(working))
        else:
            r = float(second_pass_ratio)
        if not 0 <= r <= 1:
            raise DupstudioError(f"second-pass ratio must lie in [0, 1], got {r}")
        # how many times the shared part (codes + norms) comes from DRAM per token
        mult = {"cache": 1.0, "dram": float(K), "measured": 1.0 + r * (K - 1)}

        kv_read_dec = K * (context + 1) * kv_row
        kv_write_dec = K * kv_row
        kv_read_pre = K * sum(chunk_ends) * kv_row
        kv_write_pre = K * P * kv_row
        fl_lin_dec = K * 2 * n_lin
        fl_att_dec = K * 4 * H * hd * (context + 1)
        if p.quantized:  # one (peak, FLOPs) term per bit width present in the block
            fl_dec = [(prof.quantized_tflops(b, "decode"), K * 2 * n) for b, n in parts]
            fl_pre = [(prof.quantized_tflops(b, "prefill"), K * 2 * n * P) for b, n in parts]
        else:
            fl_dec, fl_pre = [(float_peak, fl_lin_dec)], [(float_peak_pre, K * 2 * n_lin * P)]
        fl_dec = fl_dec + [(float_peak, fl_att_dec)]
        fl_pre = fl_pre + [(float_peak_pre, K * 4 * H * hd * (P * (P + 1) // 2))]
        dram = {}
        for a in ASSUMPTIONS:
            weights = code_b * mult[a] + sb_b + rep_b  # codes, scales/biases, replica parameters
            norms = norm_b * mult[a]
            wq, wf = (weights, norms) if p.quantized else (0.0, weights + norms)
            acc[("decode", a)].add(wq, wf + kv_read_dec + kv_write_dec, fl_dec)
            if P:
                acc[("prefill", a)].add(wq * chunks, wf * chunks + kv_read_pre + kv_write_pre, fl_pre)
            comp["block_weights"][a] += shared * mult[a] + sb_b
            dram[a] = weights + norms + kv_read_dec + kv_write_dec
        comp["replica_params"] += rep_b
        comp["kv_read"] += kv_read_dec
        comp["kv_write"] += kv_write_dec
        passes["decode"] += K
        passes["prefill"] += K * chunks
        extra_rows["prefill"] += K * (P - chunks)

        storage_linear += code_b + sb_b + rep_b
        storage_norms += norm_b
        linear_values += n_lin
        breakdown.append(BlockBreakdown(
            index=k, bits=p.bits, group_size=p.group_size, replicas=K, mode=p.mode, linear_params=n_lin,
            code_bytes=code_b, scale_bias_bytes=sb_b, norm_bytes=norm_b, weight_bytes=weight_b,
            replica_param_bytes=rep_b, working_set_bytes=working, fits_in_cache=fits,
            cache_fraction=working / prof.cache_bytes if prof.cache_bytes else float("inf"),
            second_pass_ratio=r, kv_read_bytes=kv_read_dec, kv_write_bytes=kv_write_dec,
            flops=fl_lin_dec + fl_att_dec, passes=K, dram_bytes=dram))

    # embedding: one row per token; head: the whole matrix (tied: the embedding matrix)
    row_code, row_sb = matrix_bytes(h, embed.bits, embed.group_size)
    emb_row = row_code + row_sb
    head_code, head_sb = matrix_bytes(V * h, head_plan.bits, head_plan.group_size)
    head_b = head_code + head_sb
    final_norm = h * NORM_BYTES
    head_peak = {ph: (prof.quantized_tflops(head_plan.bits, "prefill" if ph == "prefill" and
                                            prefill_logits == "all" else "decode")
                      if head_plan.quantized else
                      (float_peak_pre if ph == "prefill" and prefill_logits == "all" else float_peak))
                 for ph in PHASES}
    head_logit_rows = {"decode": 1, "prefill": (P if prefill_logits == "all" else 1) if P else 0}
    head_reads = {"decode": 1, "prefill": (chunks if prefill_logits == "all" else 1) if P else 0}
    emb_rows = {"decode": 1, "prefill": P}
    for ph in PHASES:
        for a in ASSUMPTIONS:
            e = emb_rows[ph] * emb_row
            acc[(ph, a)].add(*((e, 0.0) if embed.quantized else (0.0, e)), gemv=True)
            hb = head_reads[ph] * head_b
            norm = final_norm if head_reads[ph] else 0.0
            acc[(ph, a)].add(*((hb, norm) if head_plan.quantized else (0.0, hb + norm)),
                             [(head_peak[ph], 2 * V * h * head_logit_rows[ph])],
                             gemv=head_logit_rows[ph] <= 1)

    comp["embedding"] = emb_row
    comp["head"] = head_b
    comp["final_norm"] = final_norm

    decode = {a: acc[("decode", a)].estimate("decode", a, 1, passes["decode"]) for a in ASSUMPTIONS}
    prefill = {a: acc[("prefill", a)].estimate("prefill", a, P, passes["prefill"], extra_rows["prefill"])
               for a in ASSUMPTIONS}

    emb_code, emb_sb = matrix_bytes(V * h, embed.bits, embed.group_size)
    emb_store = emb_code + emb_sb
    head_store = 0.0 if shape["tied_embeddings"] else head_b
    storage = {"block_linears": storage_linear, "block_norms": storage_norms, "embedding": emb_store,
               "head": head_store, "final_norm": final_norm,
               "total": storage_linear + storage_norms + emb_store + head_store + final_norm}
    notes = []
    if any(p.replicas > 1 for p in plans):
        notes.append("each replica pass has its own KV cache (its input differs), so KV bytes scale with K "
                     "under every assumption")
    return RooflineResult(
        label=label, profile=prof.name, shape=shape, context=int(context), prefill_tokens=P,
        plans=[asdict(p) for p in plans], embed=asdict(embed), head=asdict(head_plan),
        decode=decode, prefill=prefill, blocks=breakdown, components=comp,
        bits_per_weight=8 * storage_linear / linear_values, storage_bytes=storage, notes=notes)


# --------------------------------------------------------------------------- plotting helper
def roofline_curve(profile: Union[HardwareProfile, str, None] = None,
                   results: Iterable[RooflineResult] = (), *, n: int = 61,
                   min_intensity: float = 1e-2, max_intensity: float = 1e4) -> dict:
    """The log-log roofline of ``profile`` (arithmetic intensity in FLOP/byte -> attainable FLOP/s)
    and each result's points (intensity, achieved FLOP/s as predicted, with and without the floor).

    Lines: ``attainable[path]`` = min(peak[path], intensity x achievable bandwidth) for the float path
    (float16 fraction) and the quantized path (quantized fraction); ``nominal`` uses the nominal
    bandwidth and the float peak. The ridge is where the slope meets the ceiling."""
    prof = _as_profile(profile)
    bw = prof.bandwidth_bytes_per_s
    lo, hi = math.log10(min_intensity), math.log10(max_intensity)
    xs = [10 ** (lo + (hi - lo) * j / (n - 1)) for j in range(n)]
    peaks = {"float": prof.float_tflops * 1e12, "quantized": prof.quantized_matmul_tflops * 1e12}
    bws = {"float": prof.achievable_bandwidth_fraction_fp16 * bw,
           "quantized": prof.achievable_bandwidth_fraction * bw}
    lines = {path: [min(peaks[path], x * bws[path]) for x in xs] for path in peaks}
    nominal = [min(peaks["float"], x * bw) for x in xs]
    points = []
    for res in results:
        for ph in PHASES:
            for a, e in getattr(res, ph).items():
                if not e.tokens or not e.predicted_ms:
                    continue
                points.append({
                    "label": res.label, "phase": ph, "assumption": a, "intensity": e.intensity,
                    "achieved_flops": e.flops / (e.predicted_ms * 1e-3),
                    "achieved_flops_no_floor": e.flops / (e.predicted_no_floor_ms * 1e-3)
                    if e.predicted_no_floor_ms else float("inf"),
                    "predicted_ms": e.predicted_ms, "bound": e.bound})
    return {
        "profile": prof.name,
        "intensity": xs,
        "attainable": lines,
        "nominal": nominal,
        "peak_flops": peaks,
        "bandwidth_bytes_per_s": {"nominal": bw, **bws},
        "ridge_intensity": {path: peaks[path] / bws[path] for path in peaks},
        "points": points,
    }


# --------------------------------------------------------------------------- text table
def format_table(results: Sequence[RooflineResult], phase: str = "decode") -> str:
    """A plain-text table: one row per configuration and assumption."""
    w = max([13] + [len(r.label) for r in results])
    head = (f"{'configuration':{w}} {'assumption':10} {'MB/token' if phase == 'decode' else 'MB':>9} "
            f"{'GFLOP':>9} {'passes':>6} {'bw ms':>8} {'comp ms':>8} {'floor ms':>8} "
            f"{'pred ms':>8} {'no-floor':>8} {'per-comp':>8} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        for a in ASSUMPTIONS:
            e = getattr(r, phase)[a]
            lines.append(f"{r.label:{w}} {a:10} {e.bytes / 1e6:9.2f} {e.flops / 1e9:9.3f} {e.passes:6d} "
                         f"{e.bandwidth_ms:8.3f} {e.compute_ms:8.3f} {e.overhead_ms:8.3f} "
                         f"{e.predicted_ms:8.3f} {e.predicted_no_floor_ms:8.3f} "
                         f"{e.predicted_per_component_ms:8.3f} {e.tokens_per_s:8.1f}")
    return "\n".join(lines)


__all__ = [
    "ASSUMPTIONS", "PHASES", "PROFILE_FIGURES", "SHAPE_PRESETS", "BlockPlan", "EmbedPlan", "HardwareProfile",
    "Estimate", "BlockBreakdown", "RooflineResult", "predict", "roofline_curve", "shape_from_hf_config",
    "preset_shape", "check_shape", "block_matrices", "uniform_plan", "plans_from_config",
    "resolve_profile_name", "matrix_bytes", "load_profiles",
    "load_profiles_doc", "get_profile", "default_profile_name", "profiles_path", "validate_profile",
    "validate_profiles_doc", "format_table",
]
