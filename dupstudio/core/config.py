"""The replication configuration (schema v1): typed objects, versioned JSON, validation,
atomic save, and the sidecar ``.safetensors`` holding calibrated tensors.

Semantics (see README "Configuration JSON"):

* Every decoder block k has K_k replicas (1-4) and a mode, ``serial`` or ``parallel``.
  All replicas of a block share ONE set of b-bit codes (the primary replica's, from the
  block's scale/zero strategy). Each replica has its own affine parameters: ``group``
  granularity = its own fp16 scale and bias per group; ``channel`` granularity = a per-row
  (output channel) scale and offset applied on top of the primary's dequantized weights.
* Serial:   h1 = f(h; θ1); for i >= 2: h_i = h_{i-1} + α_i (f(h_{i-1}; θ_i) - h_{i-1}).
* Parallel: y = h + Σ_i w_i (f(h; θ_i) - h)   (the input enters the residual once).
* Block output: out = h + β (y - h), β = ``residual_gain`` (1 = unchanged; also for K = 1).
* ``gains`` holds α (serial; gains[0] is unused and must be 1) or w (parallel, default 1/K).
  A new serial replica starts at α = 1 (plain repetition); calibration starts it at α = 0.
* Optional per-row gains (per matrix) and per-column gains (tied per shared input: q/k/v,
  gate/up, o (per KV head group), down) live in the sidecar; they fold exactly into the
  scales/biases and RMSNorm weights.

Tensors in the sidecar are keyed ``b{k}.r{i}.{matrix}.{scales|biases|row_gain|ch_scale|ch_offset}``,
``b{k}.{matrix}.codes`` (packed uint32 shared codes, when fixed by calibration) and
``b{k}.r{i}.col.{attn|mlp|o|down}``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dupstudio.core.jobs import DupstudioError
from dupstudio.core.safeio import atomic_write_bytes, check_int, describe_value, user_io

SCHEMA_VERSION = 1
MODES = ("serial", "parallel")
INITS = ("copy", "lsq", "gamma", "offset", "strategy")
GRANULARITIES = ("group", "channel")
MAX_REPLICAS = 4
SUPPORTED_BITS = (2, 3, 4, 8)
COL_GROUPS = ("attn", "mlp", "o", "down")


@dataclass
class ReplicaSpec:
    init: str = "copy"
    init_args: dict = field(default_factory=dict)
    granularity: str = "group"


@dataclass
class BlockSpec:
    index: int
    replicas: int = 1
    mode: str = "serial"
    gains: list = field(default_factory=lambda: [1.0])
    residual_gain: float = 1.0
    replica: list = field(default_factory=lambda: [ReplicaSpec()])
    bits: Optional[int] = None
    group_size: Optional[int] = None
    strategy: Optional[str] = None
    strategy_args: Optional[dict] = None
    calibration: Optional[dict] = None

    def set_replicas(self, k: int, mode: Optional[str] = None) -> None:
        """Change K (and mode), keeping existing replica specs, with the default gains."""
        if not 1 <= k <= MAX_REPLICAS:
            raise DupstudioError(f"block {self.index}: replicas must be 1-{MAX_REPLICAS}, got {k}")
        mode = mode or self.mode
        if mode not in MODES:
            raise DupstudioError(f"block {self.index}: mode must be serial or parallel, got {mode!r}")
        self.replicas, self.mode = k, mode
        self.replica = (self.replica + [ReplicaSpec() for _ in range(k)])[:k]
        self.gains = default_gains(k, mode)
        self.calibration = None


def default_gains(k: int, mode: str) -> list:
    return [1.0] * k if mode == "serial" else [1.0 / k] * k


@dataclass
class QuantDefaults:
    bits: int = 2
    group_size: int = 64
    strategy: str = "minmax"
    strategy_args: dict = field(default_factory=dict)


@dataclass
class EmbeddingSpec:
    bits: Optional[int] = None  # None: kept in floating point (float16 deployed)
    group_size: int = 64


@dataclass
class ModelRef:
    source: str = ""
    architecture: str = "llama"
    num_blocks: int = 0
    fingerprint: str = ""


@dataclass
class Config:
    model: ModelRef
    defaults: QuantDefaults = field(default_factory=QuantDefaults)
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)
    blocks: list = field(default_factory=list)
    tensors_file: Optional[str] = None
    provenance: dict = field(default_factory=dict)
    results: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    # runtime only: calibrated tensors (name -> numpy/mx array); saved to the sidecar
    tensors: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- helpers
    def block_quant(self, k: int) -> tuple:
        """(bits, group_size, strategy, strategy_args) in force for block k."""
        b = self.blocks[k]
        d = self.defaults
        return (d.bits if b.bits is None else b.bits,
                d.group_size if b.group_size is None else b.group_size,
                d.strategy if b.strategy is None else b.strategy,
                d.strategy_args if b.strategy_args is None else b.strategy_args)

    def copy(self) -> "Config":
        new = copy.deepcopy(self)
        return new

    def to_dict(self) -> dict:
        d = {
            "schema_version": self.schema_version,
            "model": asdict(self.model),
            "defaults": asdict(self.defaults),
            "embedding": asdict(self.embedding),
            "blocks": [_block_to_dict(b) for b in self.blocks],
            "tensors": None,
            "provenance": self.provenance,
            "results": self.results,
        }
        return d


def _block_to_dict(b: BlockSpec) -> dict:
    d = {
        "index": b.index, "replicas": b.replicas, "mode": b.mode,
        "gains": [float(g) for g in b.gains], "residual_gain": float(b.residual_gain),
        "replica": [asdict(r) for r in b.replica],
    }
    for key in ("bits", "group_size", "strategy", "strategy_args", "calibration"):
        v = getattr(b, key)
        if v is not None:
            d[key] = v
    return d


# --------------------------------------------------------------------------- construction
def fingerprint(shape: dict) -> str:
    keys = ("hidden_size", "intermediate_size", "num_blocks", "num_heads", "num_kv_heads",
            "head_dim", "vocab_size", "tied_embeddings")
    blob = json.dumps([shape.get(k) for k in keys])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_config(shape: dict, *, source: str = "", architecture: str = "llama", bits: int = 2,
               group_size: int = 64, strategy: str = "minmax", strategy_args: Optional[dict] = None,
               replicas: int = 1, mode: str = "serial", layers: Optional[list] = None,
               init: str = "copy", granularity: str = "group",
               embedding_bits: Optional[int] = None) -> Config:
    n = int(shape["num_blocks"])
    if not _integer(replicas) or not 1 <= replicas <= MAX_REPLICAS:
        raise DupstudioError(f"replicas: K must be 1-{MAX_REPLICAS}, got {describe_value(replicas)}")
    _choice(mode, MODES, "mode")
    cfg = Config(model=ModelRef(source=source, architecture=architecture, num_blocks=n,
                                fingerprint=fingerprint(shape)),
                 defaults=QuantDefaults(bits, group_size, strategy, dict(strategy_args or {})),
                 embedding=EmbeddingSpec(bits=embedding_bits, group_size=group_size))
    layers = set(range(n)) if layers is None else set(layers)
    for k in range(n):
        b = BlockSpec(index=k)
        if k in layers and replicas > 1:
            b.set_replicas(replicas, mode)
            for r in b.replica[1:]:
                r.init, r.granularity = init, granularity
        cfg.blocks.append(b)
    validate(cfg, shape)
    return cfg


def parse_layers(text: str, n: int) -> list:
    """'0-29', '3,5,7-9', 'all' -> sorted block indices (checked against n blocks)."""
    if text in ("all", "*", ""):
        return list(range(n))
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise DupstudioError(f"--layers: {part!r} is an empty range (write the lower "
                                         f"block first, e.g. {b}-{a})")
                out.update(range(max(a, -1), min(b, n) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise DupstudioError(f"--layers: cannot parse {part!r} (use e.g. 0-29 or 3,5,7-9)")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise DupstudioError(f"--layers: block {min(bad) if min(bad) < 0 else max(bad)} is beyond "
                             f"the model (it has {n} blocks, 0-{n - 1})")
    return sorted(out)


# --------------------------------------------------------------------------- validation
# The one validation layer for configurations: the loader, the CLI and the GUI all go through
# validate(), which checks every field's type and range (a hand-edited or damaged file must
# give a message naming the field, never a traceback or a silently defaulted value).
MAX_BLOCKS = 4096  # decoder blocks of a configuration (the largest llamas have ~130)
GROUP_SIZES = (32, 64, 128)
MAX_GAIN = 1e3  # |α|, |w|, |β|: calibrated gains stay near [0, 2]; far beyond is a damaged file
_ARG_RULES = {  # strategy / replica-init argument -> (accepts the value?, wording of the rule)
    "p": (lambda v: _real(v) and 50 < v <= 100, "a number in (50, 100]"),
    "k": (lambda v: _real(v) and 0 < v <= 100, "a number in (0, 100]"),
    "trim": (lambda v: _real(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "f": (lambda v: _real(v) and -1 <= v <= 1, "a number in [-1, 1]"),
    "min_ratio": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "steps": (lambda v: _integer(v) and 1 <= v <= 1000, "an integer in 1-1000"),
    "ratios": (lambda v: v is None or (isinstance(v, list) and 0 < len(v) <= 1000
                                       and all(_real(x) and 0 < x <= 1 for x in v)),
               "null or a list of 1-1000 numbers in (0, 1]"),
    "grid": (lambda v: v in ("int", "full", "midrise"), "'int', 'full' or 'midrise'"),
    "error": (lambda v: v in ("mse", "act"), "'mse' or 'act'"),
    "zero_exact": (lambda v: isinstance(v, bool), "true or false"),
    "gamma": (lambda v: _real(v) and 0 < v <= 10, "a number in (0, 10]"),
    "fraction": (lambda v: _real(v) and -1 <= v <= 1, "a number in [-1, 1]"),
}
_INIT_ARGS = {"copy": (), "lsq": (), "gamma": ("gamma",), "offset": ("fraction",)}


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    """A finite number (bools, NaN and infinities are not)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _fail(where: str, expected: str, got) -> None:
    raise DupstudioError(f"{where}: expected {expected}, got {describe_value(got)}")


def _choice(v, allowed, where: str, what: str = "one of", optional: bool = False) -> None:
    if optional and v is None:
        return
    ok = (_integer(v) or isinstance(v, str)) and v in allowed
    if not ok:
        hint = " (or omit it for the default)" if optional else ""
        _fail(where, f"{what} {', '.join(map(str, allowed))}{hint}", v)


def _check_type(v, kind, where: str, expected: str) -> None:
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        _fail(where, expected, v)


def _check_args(args, where: str, allowed: tuple) -> None:
    """Argument dict of a strategy or replica init: known keys, each value within its rule."""
    if not isinstance(args, dict):
        _fail(where, "an object", args)
    for key, v in args.items():
        if key not in allowed:
            raise DupstudioError(f"{where}: unknown argument {key!r} (accepted: "
                                 f"{', '.join(allowed) or 'none'})")
        ok, rule = _ARG_RULES.get(key, (lambda x: True, ""))
        if not ok(v):
            _fail(f"{where}.{key}", rule, v)


def check_strategy(strategy, args, where: str) -> None:
    """A known strategy name and arguments it accepts, each within range."""
    from dupstudio.core import quant

    if not isinstance(strategy, str) or strategy not in quant.STRATEGIES:
        name = repr(strategy) if isinstance(strategy, str) else describe_value(strategy)
        raise DupstudioError(f"{where}.strategy: unknown strategy {name} "
                             f"(known: {', '.join(sorted(quant.STRATEGIES))})")
    _check_args(args, f"{where}.strategy_args", tuple(quant.strategy_params(strategy)))


def _check_gain(v, where: str) -> None:
    if not _real(v) or abs(v) > MAX_GAIN:
        _fail(where, f"a finite number within ±{MAX_GAIN:g}", v)


def _check_replica(r, where: str) -> None:
    if not isinstance(r, ReplicaSpec):
        _fail(where, "a replica entry", r)
    _choice(r.init, INITS, f"{where}.init")
    _choice(r.granularity, GRANULARITIES, f"{where}.granularity")
    if r.init == "strategy":
        args = dict(r.init_args) if isinstance(r.init_args, dict) else r.init_args
        if not isinstance(args, dict):
            _fail(f"{where}.init_args", "an object", args)
        check_strategy(args.pop("strategy", "percentile"), args, f"{where}.init_args")
    else:
        _check_args(r.init_args, f"{where}.init_args", _INIT_ARGS[r.init])


def _check_calibration(cal, where: str) -> None:
    if cal is None:
        return
    if not isinstance(cal, dict):
        _fail(where, "an object or null", cal)
    if cal:
        for key in ("loss_before", "loss_after"):
            v = cal.get(key)
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                _fail(f"{where}.{key}", "a number", v)


def _check_block(b, cfg: "Config", where: str) -> None:
    _check_type(b.replicas, numbers.Integral, f"{where}.replicas", f"an integer K in 1-{MAX_REPLICAS}")
    if not 1 <= b.replicas <= MAX_REPLICAS:
        raise DupstudioError(f"{where}.replicas: K must be 1-{MAX_REPLICAS}, got {b.replicas!r}")
    if b.mode not in MODES:
        raise DupstudioError(f"{where}.mode: must be 'serial' or 'parallel', got {describe_value(b.mode)}")
    for name, n in (("replica", len(b.replica) if isinstance(b.replica, list) else None),
                    ("gains", len(b.gains) if isinstance(b.gains, list) else None)):
        if n is None:
            _fail(f"{where}.{name}", f"a list of {b.replicas}", getattr(b, name))
        if n != b.replicas:
            raise DupstudioError(f"{where}.{name}: {n} {'replica entries' if name == 'replica' else name} "
                                 f"for K={b.replicas}")
    for i, g in enumerate(b.gains):
        _check_gain(g, f"{where}.gains[{i}]")
    _check_gain(b.residual_gain, f"{where}.residual_gain")
    for r_i, r in enumerate(b.replica):
        _check_replica(r, f"{where}.replica[{r_i}]")
    _choice(b.bits, SUPPORTED_BITS, f"{where}.bits", optional=True)
    _choice(b.group_size, GROUP_SIZES, f"{where}.group_size", optional=True)
    if b.strategy is not None or b.strategy_args is not None:
        d = cfg.defaults
        check_strategy(d.strategy if b.strategy is None else b.strategy,
                       d.strategy_args if b.strategy_args is None else b.strategy_args, where)
    _check_calibration(b.calibration, f"{where}.calibration")


def _check_model_ref(m) -> int:
    for key in ("source", "architecture", "fingerprint"):
        _check_type(getattr(m, key), str, f"model.{key}", "a string")
    return check_int(m.num_blocks, "model.num_blocks", 1, MAX_BLOCKS)


def _check_quant(cfg: "Config") -> None:
    d, e = cfg.defaults, cfg.embedding
    _choice(d.bits, SUPPORTED_BITS, "defaults.bits")
    _choice(d.group_size, GROUP_SIZES, "defaults.group_size")
    check_strategy(d.strategy, d.strategy_args, "defaults")
    _choice(e.bits, SUPPORTED_BITS, "embedding.bits", optional=True)
    _choice(e.group_size, GROUP_SIZES, "embedding.group_size")


def _check_against_model(cfg: "Config", shape: dict) -> list:
    """The model's row widths (every group size must divide them); checks blocks and fingerprint."""
    n = int(shape["num_blocks"])
    if cfg.model.num_blocks != n:
        raise DupstudioError(f"model.num_blocks: the configuration is for {cfg.model.num_blocks} "
                             f"blocks, the model has {n}")
    fp = fingerprint(shape)
    if cfg.model.fingerprint and cfg.model.fingerprint != fp:
        raise DupstudioError(f"model.fingerprint: the configuration was made for another model "
                             f"(fingerprint {cfg.model.fingerprint}, this model {fp})")
    if cfg.embedding.bits is not None and shape["hidden_size"] % cfg.embedding.group_size:
        raise DupstudioError(f"embedding.group_size: {cfg.embedding.group_size} does not divide the "
                             f"hidden size {shape['hidden_size']}")
    return [shape["hidden_size"], shape["intermediate_size"], shape["num_heads"] * shape["head_dim"]]


def validate(cfg: Config, shape: Optional[dict] = None) -> None:
    """Raise DupstudioError naming the first problem. ``shape`` = model_io.model_shape(...)."""
    n = _check_model_ref(cfg.model)
    _check_quant(cfg)
    for key, kind in (("provenance", dict), ("results", list), ("blocks", list)):
        _check_type(getattr(cfg, key), kind, key, "an object" if kind is dict else "a list")
    rows = _check_against_model(cfg, shape) if shape is not None else []
    seen = set()
    for b in cfg.blocks:
        if not isinstance(b, BlockSpec):
            _fail("blocks", "block entries", b)
        where = f"blocks[{b.index}]"
        if not _integer(b.index) or not 0 <= b.index < n:
            raise DupstudioError(f"{where}: block index {b.index!r} is beyond the model "
                                 f"({n} blocks, 0-{n - 1})")
        if b.index in seen:
            raise DupstudioError(f"{where}: block {b.index} appears twice")
        seen.add(b.index)
        _check_block(b, cfg, where)
        g = cfg.defaults.group_size if b.group_size is None else b.group_size
        for r in rows:
            if r % g:
                raise DupstudioError(f"{where}.group_size: {g} does not divide this model's {r}-wide rows "
                                     f"(use one of {[x for x in GROUP_SIZES if all(y % x == 0 for y in rows)]})")
    if sorted(seen) != list(range(n)) and seen:
        missing = sorted(set(range(n)) - seen)
        raise DupstudioError(f"blocks: missing entries for blocks {missing[:5]}{'...' if len(missing) > 5 else ''}")


# --------------------------------------------------------------------------- JSON in/out
_TOP = {"schema_version", "model", "defaults", "embedding", "blocks", "tensors", "provenance", "results"}
_BLOCK = {"index", "replicas", "mode", "gains", "residual_gain", "replica", "bits", "group_size",
          "strategy", "strategy_args", "calibration"}


MAX_CONFIG_BYTES = 64 << 20  # a configuration JSON (the tensors live in the sidecar)


def _check_keys(obj: Any, allowed: set, where: str) -> None:
    if not isinstance(obj, dict):
        _fail(where, "an object", obj)
    unknown = set(obj) - allowed
    if unknown:
        raise DupstudioError(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _check_version(v) -> None:
    if not _integer(v):
        raise DupstudioError(f"schema_version: missing or not an integer (got {describe_value(v)})")
    if v > SCHEMA_VERSION:
        raise DupstudioError(f"schema_version {v} is newer than this dupstudio understands "
                             f"({SCHEMA_VERSION}); upgrade dupstudio")
    if v < 0:
        raise DupstudioError(f"schema_version: {v} is not a schema version (this dupstudio reads "
                             f"0-{SCHEMA_VERSION})")


def _migrate(d: dict) -> tuple:
    """Older schema versions -> current. Returns (dict, note or None)."""
    v = d.get("schema_version")
    if v == 0:
        # v0 (pre-release draft): per-block "alpha" list instead of "gains", no residual gain.
        d = copy.deepcopy(d)
        blocks = d.get("blocks") if isinstance(d.get("blocks"), list) else []
        for b in blocks:
            if isinstance(b, dict):
                if "alpha" in b:
                    b["gains"] = b.pop("alpha")
                b.setdefault("residual_gain", 1.0)
        d["schema_version"] = 1
        return d, "migrated configuration from schema version 0 to 1"
    return d, None


def _build(cls, obj, where: str):
    """A dataclass from a JSON object whose keys must all be fields of ``cls``."""
    _check_keys(obj, set(cls.__dataclass_fields__), where)
    return cls(**obj)


def _block_from_dict(bd, i: int, n: int) -> BlockSpec:
    where = f"blocks[{i}]"
    _check_keys(bd, _BLOCK, where)
    if "index" not in bd:
        raise DupstudioError(f"{where}: missing field 'index'")
    k = bd["index"]
    if not _integer(k):
        _fail(f"{where}.index", "an integer", k)
    if not 0 <= k < n:
        raise DupstudioError(f"{where}: block index {k} is beyond the model ({n} blocks, 0-{n - 1})")
    reps = bd.get("replica", [{}])
    if not isinstance(reps, list) or len(reps) > MAX_REPLICAS:
        _fail(f"{where}.replica", f"a list of at most {MAX_REPLICAS} replica entries", reps)
    reps = [_build(ReplicaSpec, rd, f"{where}.replica[{j}]") for j, rd in enumerate(reps)]
    fields = {key: v for key, v in bd.items() if key != "replica"}
    k_rep = fields.get("replicas", 1)
    if "gains" not in fields and _integer(k_rep) and 1 <= k_rep <= MAX_REPLICAS:
        fields["gains"] = default_gains(k_rep, fields.get("mode", "serial"))
    return BlockSpec(replica=reps, **fields)


def from_dict(d: dict, base_dir: Optional[Path] = None, shape: Optional[dict] = None) -> Config:
    if not isinstance(d, dict):
        raise DupstudioError("configuration: expected a JSON object at the top level")
    _check_version(d.get("schema_version"))
    d, note = _migrate(d)
    _check_keys(d, _TOP, "configuration")
    for key in ("model", "defaults", "blocks"):
        if key not in d:
            raise DupstudioError(f"configuration: missing field {key!r}")
    model = _build(ModelRef, d["model"], "model")
    # checked before anything is sized by it (missing blocks are filled in below)
    n = check_int(model.num_blocks, "model.num_blocks", 1, MAX_BLOCKS)
    defaults = _build(QuantDefaults, d["defaults"], "defaults")
    emb = d.get("embedding")
    embedding = _build(EmbeddingSpec, {} if emb is None else emb, "embedding")
    raw = d["blocks"]
    if not isinstance(raw, list) or len(raw) > n:
        _fail("blocks", f"a list of at most {n} block entries (model.num_blocks)", raw)
    blocks = [_block_from_dict(bd, i, n) for i, bd in enumerate(raw)]
    given = {b.index for b in blocks}
    # sparse block lists are allowed: missing blocks are K = 1
    blocks += [BlockSpec(index=k) for k in range(n) if k not in given]
    blocks.sort(key=lambda b: b.index)
    prov, results = d.get("provenance"), d.get("results")
    cfg = Config(model=model, defaults=defaults, embedding=embedding, blocks=blocks,
                 provenance={} if prov is None else prov, results=[] if results is None else results)
    validate(cfg, shape)
    if note:
        notes = cfg.provenance.get("notes")
        cfg.provenance["notes"] = (notes if isinstance(notes, list) else []) + [note]
    t = d.get("tensors")
    if t is not None:
        _check_tensors_ref(t)
        cfg.tensors = _load_sidecar(t, base_dir)
        cfg.tensors_file = t["file"]
    return cfg


def _check_tensors_ref(t) -> None:
    _check_keys(t, {"file", "sha256"}, "tensors")
    name, digest = t.get("file"), t.get("sha256")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        _fail("tensors.file", "the name of a file beside the configuration", name)
    if not isinstance(digest, str) or len(digest) != 64:
        _fail("tensors.sha256", "a sha256 hex digest", digest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_sidecar(t: dict, base_dir: Optional[Path]) -> dict:
    import mlx.core as mx

    from dupstudio.core.safeio import read_safetensors_header

    p = Path(t["file"]) if base_dir is None else base_dir / t["file"]
    if not p.is_file():
        raise DupstudioError(f"tensors: sidecar file {p} is missing")
    with user_io(p, "read"):
        digest = _sha256(p)
    if digest != t["sha256"]:
        raise DupstudioError(f"tensors: sidecar {p} has sha256 {digest[:12]}..., the configuration "
                             f"expects {t['sha256'][:12]}... (file changed or wrong file)")
    read_safetensors_header(p)  # sizes checked before mlx allocates anything
    try:
        arrays = mx.load(str(p))
        mx.eval(arrays)
    except Exception as e:
        raise DupstudioError(f"tensors: cannot read sidecar {p} ({e})") from e
    return dict(arrays)


def loads(text: str, base_dir: Optional[Path] = None, shape: Optional[dict] = None) -> Config:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise DupstudioError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except RecursionError as e:
        raise DupstudioError("malformed JSON: nested too deeply") from e
    except ValueError as e:  # e.g. an integer literal of thousands of digits
        raise DupstudioError(f"malformed JSON: {' '.join(str(e).split())[:200]}") from e
    return from_dict(d, base_dir, shape)


def load(path: str | Path, shape: Optional[dict] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise DupstudioError(f"{path}: no such configuration file")
    real = Path(os.path.realpath(path))  # the sidecar lies beside the real file
    with user_io(path, "read"):
        if real.stat().st_size > MAX_CONFIG_BYTES:
            raise DupstudioError(f"{path}: too large for a configuration "
                                 f"({real.stat().st_size:,} bytes; at most {MAX_CONFIG_BYTES:,})")
        raw = real.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DupstudioError(f"{path}: not a UTF-8 text file") from e
    try:
        return loads(text, real.parent, shape)
    except DupstudioError as e:
        raise DupstudioError(f"{path}: {e}") from e


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


def _owned_sidecar(real: Path) -> Optional[str]:
    """The sidecar the configuration file at ``real`` references, if it was made for that file
    (named ``STEM.<sha12>.safetensors`` beside it): saving over the file may delete it. A sidecar
    another configuration made or references by copy is never this file's to delete."""
    try:
        if real.stat().st_size > MAX_CONFIG_BYTES:
            return None
        t = json.loads(real.read_text(encoding="utf-8")).get("tensors")
        name = t.get("file")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if (isinstance(name, str) and Path(name).name == name and name.startswith(real.stem + ".")
            and name.endswith(".safetensors")):
        return name
    return None


def _save_sidecar(cfg: Config, real: Path) -> tuple:
    """Write the tensors as ``STEM.<sha12>.safetensors`` beside ``real``; (path, sha256)."""
    import mlx.core as mx
    import numpy as np

    arrays = {k: (v if isinstance(v, mx.array) else mx.array(np.asarray(v)))
              for k, v in cfg.tensors.items()}
    digest = {}

    def content_name(tmp: Path) -> str:
        # content-addressed name: the previous JSON keeps pointing at its own sidecar
        digest["sha256"] = _sha256(tmp)
        return f"{real.stem}.{digest['sha256'][:12]}.safetensors"

    side = atomic_write_bytes(real.parent / f"{real.stem}.safetensors",
                              lambda f: mx.save_safetensors(f, arrays), final_name=content_name)
    return side, digest["sha256"]


def save(cfg: Config, path: str | Path) -> Path:
    """Write the JSON (and the sidecar when the config holds tensors) atomically. A symlink is
    followed: the real file is replaced and the sidecar goes beside it."""
    path = Path(path)
    real = Path(os.path.realpath(path.expanduser()))
    d = cfg.to_dict()
    owned = _owned_sidecar(real)
    cfg.tensors_file = None
    if cfg.tensors:
        side, digest = _save_sidecar(cfg, real)
        d["tensors"] = {"file": side.name, "sha256": digest}
        cfg.tensors_file = side.name
    atomic_write_bytes(real, (json.dumps(d, indent=2) + "\n").encode())
    if owned and owned != cfg.tensors_file:
        try:
            (real.parent / owned).unlink()
        except OSError:
            pass
    return path
