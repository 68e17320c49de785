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
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from dupstudio.core.jobs import DupstudioError

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
        return (b.bits or d.bits, b.group_size or d.group_size, b.strategy or d.strategy,
                b.strategy_args if b.strategy_args is not None else d.strategy_args)

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
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
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
def validate(cfg: Config, shape: Optional[dict] = None) -> None:
    """Raise DupstudioError naming the first problem. ``shape`` = model_io.model_shape(...)."""
    from dupstudio.core import quant

    d = cfg.defaults
    if d.bits not in SUPPORTED_BITS:
        raise DupstudioError(f"defaults.bits: {d.bits} is not supported (use {SUPPORTED_BITS})")
    if d.strategy not in quant.STRATEGIES:
        raise DupstudioError(f"defaults.strategy: unknown strategy {d.strategy!r} "
                             f"(known: {', '.join(sorted(quant.STRATEGIES))})")
    if cfg.embedding.bits is not None and cfg.embedding.bits not in SUPPORTED_BITS:
        raise DupstudioError(f"embedding.bits: {cfg.embedding.bits} is not supported")
    if shape is not None:
        n = int(shape["num_blocks"])
        if cfg.model.num_blocks != n:
            raise DupstudioError(f"model.num_blocks: the configuration is for {cfg.model.num_blocks} "
                                 f"blocks, the model has {n}")
        fp = fingerprint(shape)
        if cfg.model.fingerprint and cfg.model.fingerprint != fp:
            raise DupstudioError(f"model.fingerprint: the configuration was made for another model "
                                 f"(fingerprint {cfg.model.fingerprint}, this model {fp})")
        rows = [shape["hidden_size"], shape["intermediate_size"], shape["num_heads"] * shape["head_dim"]]
    else:
        n = cfg.model.num_blocks
        rows = []
    seen = set()
    for b in cfg.blocks:
        where = f"blocks[{b.index}]"
        if not isinstance(b.index, int) or not 0 <= b.index < n:
            raise DupstudioError(f"{where}: block index {b.index} is beyond the model ({n} blocks, 0-{n - 1})")
        if b.index in seen:
            raise DupstudioError(f"{where}: block {b.index} appears twice")
        seen.add(b.index)
        if not isinstance(b.replicas, int) or not 1 <= b.replicas <= MAX_REPLICAS:
            raise DupstudioError(f"{where}.replicas: K must be 1-{MAX_REPLICAS}, got {b.replicas!r}")
        if b.mode not in MODES:
            raise DupstudioError(f"{where}.mode: must be 'serial' or 'parallel', got {b.mode!r}")
        if len(b.replica) != b.replicas:
            raise DupstudioError(f"{where}.replica: {len(b.replica)} replica entries for K={b.replicas}")
        if len(b.gains) != b.replicas:
            raise DupstudioError(f"{where}.gains: {len(b.gains)} gains for K={b.replicas}")
        for r_i, r in enumerate(b.replica):
            if r.init not in INITS:
                raise DupstudioError(f"{where}.replica[{r_i}].init: unknown {r.init!r} (use {', '.join(INITS)})")
            if r.granularity not in GRANULARITIES:
                raise DupstudioError(f"{where}.replica[{r_i}].granularity: unknown {r.granularity!r} "
                                     f"(use group or channel)")
        bits = b.bits or d.bits
        if bits not in SUPPORTED_BITS:
            raise DupstudioError(f"{where}.bits: {bits} is not supported (use {SUPPORTED_BITS})")
        if b.strategy is not None and b.strategy not in quant.STRATEGIES:
            raise DupstudioError(f"{where}.strategy: unknown strategy {b.strategy!r}")
        g = b.group_size or d.group_size
        for r in rows:
            if g not in (32, 64, 128) or r % g:
                raise DupstudioError(f"{where}.group_size: {g} does not divide this model's {r}-wide rows "
                                     f"(use one of {[x for x in (32, 64, 128) if all(y % x == 0 for y in rows)]})")
    if sorted(seen) != list(range(n)) and seen:
        missing = sorted(set(range(n)) - seen)
        raise DupstudioError(f"blocks: missing entries for blocks {missing[:5]}{'...' if len(missing) > 5 else ''}")


# --------------------------------------------------------------------------- JSON in/out
_TOP = {"schema_version", "model", "defaults", "embedding", "blocks", "tensors", "provenance", "results"}
_BLOCK = {"index", "replicas", "mode", "gains", "residual_gain", "replica", "bits", "group_size",
          "strategy", "strategy_args", "calibration"}


def _check_keys(obj: Any, allowed: set, where: str) -> None:
    if not isinstance(obj, dict):
        raise DupstudioError(f"{where}: expected an object, got {type(obj).__name__}")
    unknown = set(obj) - allowed
    if unknown:
        raise DupstudioError(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _migrate(d: dict) -> tuple:
    """Older schema versions -> current. Returns (dict, note or None)."""
    v = d.get("schema_version")
    if v == 0:
        # v0 (pre-release draft): per-block "alpha" list instead of "gains", no residual gain.
        d = copy.deepcopy(d)
        for b in d.get("blocks", []):
            if "alpha" in b:
                b["gains"] = b.pop("alpha")
            b.setdefault("residual_gain", 1.0)
        d["schema_version"] = 1
        return d, "migrated configuration from schema version 0 to 1"
    return d, None


def from_dict(d: dict, base_dir: Optional[Path] = None, shape: Optional[dict] = None) -> Config:
    if not isinstance(d, dict):
        raise DupstudioError("configuration: expected a JSON object at the top level")
    v = d.get("schema_version")
    if not isinstance(v, int):
        raise DupstudioError("schema_version: missing or not an integer")
    if v > SCHEMA_VERSION:
        raise DupstudioError(f"schema_version {v} is newer than this dupstudio understands "
                             f"({SCHEMA_VERSION}); upgrade dupstudio")
    d, note = _migrate(d)
    _check_keys(d, _TOP, "configuration")
    for key in ("model", "defaults", "blocks"):
        if key not in d:
            raise DupstudioError(f"configuration: missing field {key!r}")
    try:
        _check_keys(d["model"], {"source", "architecture", "num_blocks", "fingerprint"}, "model")
        model = ModelRef(**d["model"])
        _check_keys(d["defaults"], {"bits", "group_size", "strategy", "strategy_args"}, "defaults")
        defaults = QuantDefaults(**d["defaults"])
        emb = d.get("embedding") or {}
        _check_keys(emb, {"bits", "group_size"}, "embedding")
        embedding = EmbeddingSpec(**emb)
        if not isinstance(d["blocks"], list):
            raise DupstudioError("blocks: expected a list")
        blocks = []
        for i, bd in enumerate(d["blocks"]):
            _check_keys(bd, _BLOCK, f"blocks[{i}]")
            if "index" not in bd:
                raise DupstudioError(f"blocks[{i}]: missing field 'index'")
            reps = []
            for j, rd in enumerate(bd.get("replica", [{}])):
                _check_keys(rd, {"init", "init_args", "granularity"}, f"blocks[{i}].replica[{j}]")
                reps.append(ReplicaSpec(**rd))
            bd = {k: v for k, v in bd.items() if k != "replica"}
            k_rep = bd.get("replicas", 1)
            bd.setdefault("gains", default_gains(k_rep, bd.get("mode", "serial")) if isinstance(k_rep, int) and k_rep > 0 else [])
            blocks.append(BlockSpec(replica=reps, **bd))
    except TypeError as e:
        raise DupstudioError(f"configuration: {e}") from e
    n = model.num_blocks
    given = {b.index for b in blocks}
    # sparse block lists are allowed: missing blocks are K = 1
    for k in range(n):
        if k not in given and isinstance(n, int):
            blocks.append(BlockSpec(index=k))
    blocks.sort(key=lambda b: b.index if isinstance(b.index, int) else -1)
    cfg = Config(model=model, defaults=defaults, embedding=embedding, blocks=blocks,
                 provenance=d.get("provenance") or {}, results=d.get("results") or [])
    if note:
        cfg.provenance.setdefault("notes", []).append(note)
    validate(cfg, shape)
    t = d.get("tensors")
    if t:
        _check_keys(t, {"file", "sha256"}, "tensors")
        cfg.tensors = _load_sidecar(t, base_dir)
        cfg.tensors_file = t["file"]
    return cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_sidecar(t: dict, base_dir: Optional[Path]) -> dict:
    import mlx.core as mx

    p = Path(t["file"])
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if not p.exists():
        raise DupstudioError(f"tensors: sidecar file {p} is missing")
    digest = _sha256(p)
    if digest != t.get("sha256"):
        raise DupstudioError(f"tensors: sidecar {p} has sha256 {digest[:12]}..., the configuration "
                             f"expects {str(t.get('sha256'))[:12]}... (file changed or wrong file)")
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
    return from_dict(d, base_dir, shape)


def load(path: str | Path, shape: Optional[dict] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise DupstudioError(f"{path}: no such configuration file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DupstudioError(f"{path}: not a UTF-8 text file") from e
    try:
        return loads(text, path.parent, shape)
    except DupstudioError as e:
        raise DupstudioError(f"{path}: {e}") from e


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


def save(cfg: Config, path: str | Path) -> Path:
    """Write the JSON (and the sidecar when the config holds tensors) atomically."""
    import mlx.core as mx
    import numpy as np

    path = Path(path)
    d = cfg.to_dict()
    old_side = cfg.tensors_file
    if cfg.tensors:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".safetensors")
        os.close(fd)
        try:
            arrays = {k: (v if isinstance(v, mx.array) else mx.array(np.asarray(v)))
                      for k, v in cfg.tensors.items()}
            mx.save_safetensors(tmp, arrays)
            digest = _sha256(Path(tmp))
            # content-addressed name: the previous JSON keeps pointing at its own sidecar
            side = path.parent / f"{path.stem}.{digest[:12]}.safetensors"
            os.replace(tmp, side)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        d["tensors"] = {"file": side.name, "sha256": digest}
        cfg.tensors_file = side.name
    atomic_write_bytes(path, (json.dumps(d, indent=2) + "\n").encode())
    if old_side and old_side != cfg.tensors_file and old_side.startswith(path.stem + "."):
        try:
            (path.parent / old_side).unlink()
        except OSError:
            pass
    return path
