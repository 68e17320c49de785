"""Export (base model, configuration) as an mlx-lm model folder.

Two layouts, chosen from the configuration:

* **standard** (every block K = 1 with residual gain β = 1): mlx-lm's own model of the source
  architecture (llama, mistral, qwen2, qwen3, gemma3_text, phi3: config.json keeps its
  ``model_type``) with ``QuantizedLinear`` layers. Each matrix's packed codes and its
  effective per-group scales/biases (row gains and tied column gains already folded in by
  :func:`dupstudio.core.replicate.block_tensors`; column gains into the RMSNorm weights and
  the v_proj / up_proj rows) go straight into mlx-lm's ``weight``/``scales``/``biases``
  triples; the block's other float tensors (extra norms, linear biases, per-head norms) are
  copied. It loads with plain ``mlx_lm.load(dir)``.
* **replicated** (any block with K > 1 or β ≠ 1): mlx-lm's custom-architecture mechanism.
  config.json names ``model_file: dupstudio_llama.py`` (a copy of
  :mod:`dupstudio.core.export_model_template`, depending on mlx and mlx-lm only), and
  loading needs ``trust_remote_code=True`` / ``--trust-remote-code``. Codes are stored once
  per block (``model.layers.{k}.codes.{matrix}``); each replica's scales, biases and norm
  weights under ``model.layers.{k}.replicas.{i}....``; gains and β in config.json's
  ``dupstudio`` section. The model's ``sanitize`` points all replicas at the same code
  array object. llama and mistral models get ``dupstudio_llama.py`` (a subclass of mlx-lm's
  llama); every other architecture (and a llama with sliding-window layers) gets
  ``dupstudio_model.py`` (:mod:`dupstudio.core.export_model_template_any`), which builds mlx-lm's
  own model of the architecture and copies its blocks; config.json's ``dupstudio`` section then
  also names the mlx-lm module, the matrices' places, the embedding scale and each block's
  sliding window.

β ≠ 1 on a K = 1 block has no exact fold into a standard llama block: out = h + β·a +
β·m(h + a) (a: attention residual, m: MLP residual), and scaling o_proj by β would feed the
MLP h + β·a instead of h + a. Such blocks therefore go through the replicated layout (with
``require_standard=True`` the export is refused, naming the block).

Both layouts compute exactly what ``replicate.build(loaded, cfg, "deploy")`` computes
(same fp16 scales/biases, same codes, same block formulas). Floating-point tensors that are
not quantized (norms, an unquantized embedding/head) are stored in ``dtype`` (float16 by
default, as the accounting counts them; float32 reproduces a float32 deploy model exactly).

The folder is written into a hidden temporary sibling and renamed into place at the end,
so a failed or cancelled export never leaves a complete-looking folder. A manifest
(``dupstudio-export.json``) lists what the export wrote: ``overwrite`` replaces those files
only, never the export's inputs nor anything else in the folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from dupstudio.core import adapters
from dupstudio.core.config import COL_GROUPS, Config, validate
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
from dupstudio.core.model_io import LoadedModel, model_shape
from dupstudio.core.safeio import atomic_write_bytes, make_temp_dir, remove_stale, user_io

FORMATS = ("mlx-lm",)
MODEL_FILE = "dupstudio_llama.py"
TEMPLATE = Path(__file__).with_name("export_model_template.py")
#: the model file of replicated blocks of any other architecture (it builds mlx-lm's own model of
#: the architecture config.json names and copies its blocks; see export_model_template_any)
MODEL_FILE_ANY = "dupstudio_model.py"
TEMPLATE_ANY = Path(__file__).with_name("export_model_template_any.py")
WEIGHTS_FILE = "model.safetensors"
MANIFEST_NAME = "dupstudio-export.json"  # what an export wrote; --overwrite replaces only that
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
DTYPES = ("float16", "bfloat16", "float32")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
EXPORT_FORMAT_VERSION = 1

_SIDECAR_PATTERNS = (
    re.compile(r"^b(\d+)\.r(\d+)\.(%s)\.(scales|biases|row_gain|ch_scale|ch_offset)$"
               % "|".join(adapters.ALL_MATRIX_NAMES)),
    re.compile(r"^b(\d+)\.(%s)\.codes$" % "|".join(adapters.ALL_MATRIX_NAMES)),
    re.compile(r"^b(\d+)\.r(\d+)\.col\.(%s)$" % "|".join(COL_GROUPS)),
)
#: model types whose replicated blocks go through the llama model file (a subclass of mlx-lm's
#: llama, unchanged since the first export format); the others (and a llama with sliding-window
#: layers, which that file does not reproduce) through the generic one
LLAMA_FILE_TYPES = ("llama", "mistral")


# --------------------------------------------------------------------------- planning
def replicated_reasons(cfg: Config) -> list:
    """Why the configuration needs the replicated (custom-architecture) layout; [] when a
    standard llama expresses it exactly."""
    out = []
    for b in cfg.blocks:
        if b.replicas > 1:
            out.append(f"block {b.index}: K = {b.replicas} ({b.mode})")
        elif float(b.residual_gain) != 1.0:
            out.append(f"block {b.index}: residual gain β = {b.residual_gain:g} on a K = 1 block "
                       f"(out = h + β(f(h) − h) has no exact fold into a standard llama block: "
                       f"the MLP's input h + attn would change)")
    return out


def _check_tensors(cfg: Config, arch) -> None:
    """Refuse sidecar tensors the exporter would silently drop (rather than approximate)."""
    n = len(cfg.blocks)
    for key in cfg.tensors:
        match = next((p.match(key) for p in _SIDECAR_PATTERNS if p.match(key)), None)
        if match is not None and match.re is not _SIDECAR_PATTERNS[2]:
            m = match.group(3) if match.re is _SIDECAR_PATTERNS[0] else match.group(2)
            if m not in arch.matrix_names:
                match = None  # a matrix of another architecture: nothing here to fold it into
        if match is None:
            raise DupstudioError(f"export: the configuration holds tensor {key!r}, which the "
                                 f"exporter does not know how to fold; refusing to drop it")
        k = int(match.group(1))
        if k >= n:
            raise DupstudioError(f"export: tensor {key!r} names block {k}, beyond the model")
        # tensors of replicas beyond a block's K (left from an earlier K) are unused by the
        # deploy model too, and are not exported


def _plan(loaded: LoadedModel, cfg: Config, fmt: str, dtype: str, require_standard: bool) -> dict:
    if fmt not in FORMATS:
        raise DupstudioError(f"export format {fmt!r} is not supported (use {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise DupstudioError(f"export dtype {dtype!r} is not supported (use {', '.join(DTYPES)})")
    shape = model_shape(loaded.config)
    validate(cfg, shape)
    arch = adapters.of_model(loaded.model)
    _check_tensors(cfg, arch)
    mt = loaded.config.get("model_type", "llama")
    reasons = replicated_reasons(cfg)
    if require_standard and reasons:
        raise DupstudioError(f"export: a standard mlx-lm {mt} (no custom code) cannot express this "
                             f"configuration exactly: {reasons[0]}"
                             + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    lt = loaded.config.get("layer_types")
    sliding = bool(lt) and any(t != "full_attention" for t in lt)
    generic = mt not in LLAMA_FILE_TYPES or sliding
    return {"shape": shape, "replicated": bool(reasons), "reasons": reasons, "arch": arch,
            "model_type": mt, "model_file": MODEL_FILE_ANY if generic else MODEL_FILE,
            "template": TEMPLATE_ANY if generic else TEMPLATE}


def _quant_entry(bits: int, group: int) -> dict:
    return {"group_size": int(group), "bits": int(bits)}


def _layout(loaded: LoadedModel, cfg: Config, plan: dict, dtype: str) -> tuple:
    """(tensor list [(key, shape, dtype-name)], per-layer quantization map) of the export,
    without computing any tensor."""
    shp = plan["shape"]
    H = shp["hidden_size"]
    arch = plan["arch"]
    dims = arch.dims(shp)
    paths = adapters.MATRIX_PATHS
    tensors, qmap = [], {}
    for k, b in enumerate(cfg.blocks):
        bits, g, _, _ = cfg.block_quant(k)
        for m, (o, i) in dims.items():
            packed = (o, i * bits // 32)
            groups = (o, i // g)
            if plan["replicated"]:
                tensors.append((f"model.layers.{k}.codes.{m}", packed, "uint32"))
                for r in range(b.replicas):
                    p = f"model.layers.{k}.replicas.{r}.{paths[m]}"
                    tensors += [(f"{p}.scales", groups, "float16"), (f"{p}.biases", groups, "float16")]
                    qmap[p] = _quant_entry(bits, g)
            else:
                p = f"model.layers.{k}.{paths[m]}"
                tensors += [(f"{p}.weight", packed, "uint32"), (f"{p}.scales", groups, "float16"),
                            (f"{p}.biases", groups, "float16")]
                qmap[p] = _quant_entry(bits, g)
        pres = ([f"model.layers.{k}.replicas.{r}" for r in range(b.replicas)]
                if plan["replicated"] else [f"model.layers.{k}"])
        # the block's other float tensors (norms, linear biases, per-head norms), as the
        # architecture has them
        layer = loaded.model.model.layers[k]
        extra = [(f"{n}.weight", (H,)) for n in arch.col_norms.values()]
        extra += [(n, tuple(a.shape)) for n, a in adapters.other_block_params(layer, arch).items()]
        for p in pres:
            tensors += [(f"{p}.{n}", shape, dtype) for n, shape in extra]
    V = shp["vocab_size"]
    e = cfg.embedding
    heads = ["model.embed_tokens"] + ([] if shp["tied_embeddings"] else ["lm_head"])
    for p in heads:
        if e.bits is None:
            tensors.append((f"{p}.weight", (V, H), dtype))
            qmap[p] = False
        else:
            tensors += [(f"{p}.weight", (V, H * e.bits // 32), "uint32"),
                        (f"{p}.scales", (V, H // e.group_size), "float16"),
                        (f"{p}.biases", (V, H // e.group_size), "float16")]
            qmap[p] = _quant_entry(e.bits, e.group_size)
    tensors.append(("model.norm.weight", (H,), dtype))
    return tensors, qmap


def _safetensors_bytes(tensors: list) -> int:
    """Size of a safetensors file holding ``tensors`` (header included)."""
    codes = {"uint32": "U32", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}
    nbytes = {"uint32": 4, "float16": 2, "bfloat16": 2, "float32": 4}
    header, off = {"__metadata__": {"format": "mlx"}}, 0
    for key, shape, dt in tensors:
        n = nbytes[dt]
        for s in shape:
            n *= s
        header[key] = {"dtype": codes[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + h + (-h) % 8 + off


# --------------------------------------------------------------------------- text files
def _quant_summary(cfg: Config) -> dict:
    d = cfg.defaults
    return {"bits": d.bits, "group_size": d.group_size, "strategy": d.strategy,
            "per_block": {str(k): {"bits": cfg.block_quant(k)[0], "group_size": cfg.block_quant(k)[1]}
                          for k, b in enumerate(cfg.blocks) if b.bits or b.group_size}}


def _block_specs(cfg: Config) -> list:
    return [{"replicas": b.replicas, "mode": b.mode, "gains": [float(g) for g in b.gains],
             "residual_gain": float(b.residual_gain)} for b in cfg.blocks]


def _config_json(loaded: LoadedModel, cfg: Config, plan: dict, qmap: dict, dtype: str,
                 acc: dict) -> dict:
    src = loaded.path / "config.json"
    try:
        base = json.loads(src.read_text()) if src.exists() else dict(loaded.config)
    except (OSError, json.JSONDecodeError):
        base = dict(loaded.config)
    for key in ("quantization", "quantization_config", "model_file", "dupstudio", "_name_or_path",
                "auto_map"):
        base.pop(key, None)
    q = {"group_size": cfg.defaults.group_size, "bits": cfg.defaults.bits, "mode": "affine", **qmap}
    base["quantization"] = q
    base["quantization_config"] = q  # as mlx-lm's save_config writes it
    base["torch_dtype"] = dtype
    from dupstudio import __version__

    info = {"format": EXPORT_FORMAT_VERSION, "dupstudio_version": __version__,
            "source": cfg.model.source or loaded.source, "fingerprint": cfg.model.fingerprint,
            "quantization": _quant_summary(cfg),
            "bits_per_weight": acc["bits_per_weight"], "passes": acc["passes"]}
    if plan["replicated"]:
        base["model_file"] = plan["model_file"]
        info["blocks"] = _block_specs(cfg)
        if plan["model_file"] == MODEL_FILE_ANY:
            info.update(_architecture_info(loaded, plan["arch"]))
    base["dupstudio"] = info
    return dict(sorted(base.items()))


def _architecture_info(loaded: LoadedModel, arch) -> dict:
    """What the generic model file repeats of the architecture's model around its blocks: the
    mlx-lm module, where each quantized matrix sits, the embedding scale and each block's
    sliding window."""
    args = loaded.model.args
    n = len(loaded.model.model.layers)
    scale = ({"value": float(args.hidden_size) ** 0.5, "dtype": "bfloat16"}
             if arch.embed_scale else None)
    return {"base_module": arch.name, "matrices": {m.name: m.path for m in arch.matrices},
            "embedding_scale": scale, "windows": [arch.block_window(args, k) for k in range(n)]}


def _ranges(idx: list) -> str:
    out, start, prev = [], None, None
    for i in idx + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = i
    return ", ".join(out)


def _replica_lines(cfg: Config) -> list:
    groups: dict = {}
    for b in cfg.blocks:
        key = (b.replicas, b.mode if b.replicas > 1 else "")
        groups.setdefault(key, []).append(b.index)
    lines = []
    for (K, mode), idx in sorted(groups.items()):
        desc = f"K = {K}" + (f" ({mode})" if mode else "")
        lines.append(f"- blocks {_ranges(idx)}: {desc}")
    return lines


def _norm_ppl(ppl: Any) -> Optional[dict]:
    if ppl is None:
        return None
    if isinstance(ppl, (int, float)):
        return {"ppl": float(ppl)}
    if not isinstance(ppl, dict):
        ppl = {k: getattr(ppl, k) for k in ("ppl", "windows", "ctx", "ppl_ci95", "provenance")
               if hasattr(ppl, k)}
    if "ppl" not in ppl:
        raise DupstudioError("export: ppl must be a number or carry a 'ppl' value")
    return dict(ppl)


def _readme(loaded: LoadedModel, cfg: Config, plan: dict, acc: dict, dtype: str,
            weights_bytes: int, ppl: Optional[dict], name: str) -> str:
    d = cfg.defaults
    shp = plan["shape"]
    e = cfg.embedding
    source = cfg.model.source or loaded.source
    emb_bpw = (8 * _DTYPE_BYTES[dtype] if e.bits is None else acc["embedding_bits_per_weight"])
    lines = [f"# {name}", "",
             f"A {cfg.defaults.bits}-bit quantized model exported by dupstudio "
             + ("with replicated decoder blocks." if plan["replicated"] else "(one pass per block)."), "",
             "## Source", "",
             f"- model: `{source}` (folder `{loaded.path.name}`), architecture "
             f"`{loaded.config.get('model_type')}`, {shp['num_blocks']} decoder blocks, "
             f"hidden size {shp['hidden_size']}",
             f"- configuration fingerprint: `{cfg.model.fingerprint or '-'}`"]
    cal = (cfg.provenance or {}).get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("settings"), dict):
        st = cal["settings"]
        lines.append(f"- calibrated by dupstudio: {st.get('method')} ({st.get('steps')} steps, "
                     f"{st.get('seqs')}×{st.get('seq_len')} tokens"
                     + (", row/column gains" if st.get("gains") else "")
                     + (", residual gain" if st.get("residual_gain") else "") + ")")
    else:
        lines.append("- not calibrated (scales and biases from the code strategy)")
    lines += ["",
             "## Configuration", "",
             f"- decoder-block linears: {d.bits}-bit affine codes, group size {d.group_size}, "
             f"code strategy `{d.strategy}`; fp16 scale and bias per group and replica"]
    over = [b for b in cfg.blocks if b.bits or b.group_size]
    for b in over:
        bits, g, _, _ = cfg.block_quant(b.index)
        lines.append(f"  - block {b.index}: {bits}-bit, group size {g}")
    lines.append("- replicas per block (all replicas of a block share one set of codes):")
    lines += ["  " + x for x in _replica_lines(cfg)]
    gained = [b for b in cfg.blocks if b.replicas > 1 or b.residual_gain != 1.0]
    if gained:
        lines.append("- gains (serial: α per replica, α₁ unused; parallel: w per replica) "
                     "and residual gain β:")
        for b in gained:
            gains = ", ".join(f"{g:.4g}" for g in b.gains)
            lines.append(f"  - block {b.index}: {b.mode} [{gains}], β = {b.residual_gain:.4g}")
    lines += [
        f"- embedding{'' if shp['tied_embeddings'] else ' and head'}: "
        + (f"{dtype} (not quantized)" if e.bits is None else f"{e.bits}-bit, group size {e.group_size}")
        + ("; the head reuses the embedding" if shp["tied_embeddings"] else ""),
        f"- norms and other float tensors: {dtype}", "",
        "## Size and quality", "",
        f"- bits per weight of the decoder-block linears: {acc['bits_per_weight']:.4f} "
        f"(codes plus every stored scale, bias and gain at 16 bits)",
        f"- embedding: {emb_bpw:.3f} bits per weight",
        f"- decoder passes per token: {acc['passes']} ({shp['num_blocks']} blocks; "
        f"FLOPs {acc['flops_ratio']:.2f}× the one-pass model)",
        f"- {WEIGHTS_FILE}: {weights_bytes:,} bytes",
    ]
    if ppl:
        where = ""
        if ppl.get("windows") and ppl.get("ctx"):
            where = f" on {ppl['windows']}×{ppl['ctx']} tokens"
        prov = ppl.get("provenance") or {}
        text = prov.get("text_path") or prov.get("text")
        if text:
            where += f" of {Path(str(text)).name}"
        ci = ppl.get("ppl_ci95")
        ci_s = f" (95% interval {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
        lines.append(f"- perplexity measured by dupstudio{where}: {ppl['ppl']:.3f}{ci_s}")
    else:
        lines.append("- perplexity: not measured for this export")
    lines += ["", "## Loading", ""]
    if plan["replicated"]:
        lines += [
            "This model needs **`--trust-remote-code`** (Python: `trust_remote_code=True`).",
            "",
            "Why: its blocks are replicated — each block runs K passes (serial or parallel, "
            "with per-replica gains and a residual gain) whose replicas share one set of packed "
            f"codes and differ only in their scales, biases and norms. mlx-lm's standard "
            f"{plan['model_type']} has no such block, so config.json names a model file, `"
            + plan["model_file"] + "`, which "
            "mlx-lm imports to build the architecture. It is short, depends only on mlx and "
            "mlx-lm, and is worth reading before you trust it. Each replica pass has its own "
            "KV cache.",
            "",
            "```python",
            "from mlx_lm import load, generate",
            f'model, tokenizer = load("{name}", trust_remote_code=True)',
            'print(generate(model, tokenizer, prompt="Hello", max_tokens=50))',
            "```", "",
            "```sh",
            f'python -m mlx_lm generate --model {name} --trust-remote-code --prompt "Hello"',
            "```",
        ]
    else:
        lines += [
            f"A standard mlx-lm {plan['model_type']} with quantized layers: no custom code is needed.",
            "",
            "```python",
            "from mlx_lm import load, generate",
            f'model, tokenizer = load("{name}")',
            'print(generate(model, tokenizer, prompt="Hello", max_tokens=50))',
            "```", "",
            "```sh",
            f'python -m mlx_lm generate --model {name} --prompt "Hello"',
            "```",
        ]
    if dtype != "float32":
        lines += ["", f"Activations run in {dtype}. MLX's CPU backend (Linux without a GPU) runs "
                  f"{dtype} matrix products very slowly (about 50× slower than float32 here); "
                  "for CPU use, export with dtype float32 (`dupstudio export --dtype float32`)."]
    lines += ["", "The tokenizer files and chat template are copied from the source model; its "
              "licence terms apply to this derivative.", ""]
    return "\n".join(lines)


def _tokenizer_files(loaded: LoadedModel) -> list:
    files = [loaded.path / f for f in TOKENIZER_FILES if (loaded.path / f).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
        raise DupstudioError(f"export: {loaded.path} has no tokenizer (tokenizer.json) to copy")
    return files


# --------------------------------------------------------------------------- public API
def preview_export(loaded: LoadedModel, cfg: Config, *, fmt: str = "mlx-lm",
                   dtype: str = "float16", require_standard: bool = False) -> dict:
    """Size estimate and bits per weight of an export, before writing anything (fast: no
    tensor is computed). Raises DupstudioError where :func:`export_model` would refuse."""
    from dupstudio.core.replicate import accounting

    plan = _plan(loaded, cfg, fmt, dtype, require_standard)
    acc = accounting(cfg, plan["shape"])
    tensors, qmap = _layout(loaded, cfg, plan, dtype)
    wbytes = _safetensors_bytes(tensors)
    name = "export"
    files = {WEIGHTS_FILE: wbytes}
    files["config.json"] = len(json.dumps(_config_json(loaded, cfg, plan, qmap, dtype, acc),
                                          indent=2).encode())
    files["README.md"] = len(_readme(loaded, cfg, plan, acc, dtype, wbytes, None, name).encode())
    if plan["replicated"]:
        files[plan["model_file"]] = plan["template"].stat().st_size
    for f in _tokenizer_files(loaded):
        files[f.name] = f.stat().st_size
    return _summary(cfg, plan, acc, files, None, dtype)


def _summary(cfg: Config, plan: dict, acc: dict, files: dict, path: Optional[Path],
             dtype: str) -> dict:
    out = {
        "bytes": sum(files.values()),
        "weights_bytes": files[WEIGHTS_FILE],
        "bits_per_weight": acc["bits_per_weight"],
        "embedding_bits_per_weight": (8 * _DTYPE_BYTES[dtype] if cfg.embedding.bits is None
                                      else acc["embedding_bits_per_weight"]),
        "dtype": dtype,
        "passes": acc["passes"],
        "format": "mlx-lm",
        "architecture": f"custom ({plan['model_file']})" if plan["replicated"] else plan["model_type"],
        "trust_remote_code": plan["replicated"],
        "reasons": plan["reasons"],
        "files": dict(files),
    }
    if path is not None:
        out["path"] = str(path)
    return out


def export_model(loaded: LoadedModel, cfg: Config, out_dir: str | Path, *,
                 progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                 ppl: Any = None, fmt: str = "mlx-lm", dtype: str = "float16",
                 overwrite: bool = False, require_standard: bool = False,
                 inputs: tuple = ()) -> dict:
    """Write an mlx-lm model folder for (loaded, cfg) at ``out_dir``; return its size on
    disk (``bytes``), ``bits_per_weight``, ``path`` and what it needs to load.

    ``ppl``: a measured perplexity to state in the README (a number, a dict with ``ppl``
    and optionally ``windows``/``ctx``/``ppl_ci95``, or an evaluate.EvalResult).
    ``overwrite``: replace a previous export at ``out_dir`` — only the files its manifest
    (``dupstudio-export.json``) lists; other files there are kept. A folder without a manifest
    is refused, and so is replacing any of ``inputs`` (the configuration and its sidecar) or
    the model folder itself.
    ``require_standard``: refuse configurations that need the custom model file."""
    import mlx.core as mx

    from dupstudio.core.replicate import accounting

    progress, cancel = ensure(progress, cancel)
    plan = _plan(loaded, cfg, fmt, dtype, require_standard)
    ppl = _norm_ppl(ppl)
    out_dir = Path(out_dir).expanduser().absolute()
    tok_files = _tokenizer_files(loaded)
    names = [WEIGHTS_FILE, "config.json", "README.md", MANIFEST_NAME] + [f.name for f in tok_files]
    names += [plan["model_file"]] if plan["replicated"] else []
    old = _check_target(out_dir, names, overwrite, [loaded.path, *inputs])
    acc = accounting(cfg, plan["shape"])
    remove_stale(out_dir.parent)
    tmp = make_temp_dir(out_dir, "partial")
    try:
        with user_io(out_dir):
            weights = _export_weights(loaded, cfg, plan, getattr(mx, dtype), progress, cancel)
            cancel.check()
            progress(0.92, f"writing {WEIGHTS_FILE}")
            atomic_write_bytes(tmp / WEIGHTS_FILE,
                               lambda f: mx.save_safetensors(f, weights, metadata={"format": "mlx"}))
            del weights
            cancel.check()
            _write_text_files(tmp, loaded, cfg, plan, acc, dtype, ppl, tok_files, out_dir.name)
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            atomic_write_bytes(tmp / MANIFEST_NAME, _manifest(files))
            cancel.check()
            progress(0.98, "moving the export into place")
            _move_into_place(tmp, out_dir, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {n: (out_dir / n).stat().st_size for n in names}
    progress(1.0, f"exported to {out_dir}")
    return _summary(cfg, plan, acc, files, out_dir, dtype)


def _export_weights(loaded: LoadedModel, cfg: Config, plan: dict, mdt, progress, cancel) -> dict:
    """Every tensor of the export (evaluated), block by block."""
    import mlx.core as mx

    from dupstudio.core.model_io import block_linears
    from dupstudio.core.replicate import block_tensors, embedding_modules

    weights: dict = {}
    lin = block_linears(loaded.model)
    arch = plan["arch"]
    paths = adapters.MATRIX_PATHS
    n = len(cfg.blocks)
    for k, spec in enumerate(cfg.blocks):
        cancel.check()
        bt = block_tensors(loaded, cfg, k, float_weights=lin[k])
        new = {}
        if plan["replicated"]:
            for m in arch.matrix_names:
                new[f"model.layers.{k}.codes.{m}"] = bt.packed[m]
            pres = [f"model.layers.{k}.replicas.{i}" for i in range(spec.replicas)]
        else:
            for m in arch.matrix_names:
                new[f"model.layers.{k}.{paths[m]}.weight"] = bt.packed[m]
            pres = [f"model.layers.{k}"]
        others = adapters.other_block_params(loaded.model.model.layers[k], arch)
        for i, p in enumerate(pres):
            for m in arch.matrix_names:
                new[f"{p}.{paths[m]}.scales"] = bt.scales[i][m].astype(mx.float16)
                new[f"{p}.{paths[m]}.biases"] = bt.biases[i][m].astype(mx.float16)
            for name, a in others.items():  # as the base model has them
                new[f"{p}.{name}"] = a.astype(mdt)
            for m, b in bt.lin_bias[i].items():  # a linear's bias, with its row gains folded
                new[f"{p}.{paths[m]}.bias"] = b.astype(mdt)
            for path, w in bt.norms[i].items():
                new[f"{p}.{path}.weight"] = w.astype(mdt)
        mx.eval(new)
        weights.update(new)
        progress(0.9 * (k + 1) / n, f"prepared block {k + 1}/{n}")
    cancel.check()
    emb, head = embedding_modules(loaded, cfg, "deploy", mdt)
    for prefix, mod in (("model.embed_tokens", emb), ("lm_head", head)):
        if mod is None:
            continue
        weights[f"{prefix}.weight"] = mod.weight
        if hasattr(mod, "scales"):
            weights[f"{prefix}.scales"] = mod.scales
            weights[f"{prefix}.biases"] = mod.biases
    weights["model.norm.weight"] = loaded.model.model.norm.weight.astype(mdt)
    mx.eval(weights)
    return weights


def _write_text_files(tmp: Path, loaded: LoadedModel, cfg: Config, plan: dict, acc: dict,
                      dtype: str, ppl: Optional[dict], tok_files: list, name: str) -> None:
    """config.json, the model file (replicated layout), the tokenizer files and the README."""
    _, qmap = _layout(loaded, cfg, plan, dtype)
    conf = _config_json(loaded, cfg, plan, qmap, dtype, acc)
    atomic_write_bytes(tmp / "config.json", (json.dumps(conf, indent=2) + "\n").encode())
    copies = ([plan["template"]] if plan["replicated"] else []) + list(tok_files)
    for f in copies:
        target = tmp / (plan["model_file"] if f == plan["template"] else f.name)
        with user_io(f, "read"):
            data = f.read_bytes()
        atomic_write_bytes(target, data)
    wbytes = (tmp / WEIGHTS_FILE).stat().st_size
    readme = _readme(loaded, cfg, plan, acc, dtype, wbytes, ppl, name)
    atomic_write_bytes(tmp / "README.md", readme.encode())


# --------------------------------------------------------------------------- the target folder
def _manifest(files: dict) -> bytes:
    doc = {"format": EXPORT_FORMAT_VERSION, "written_by": "dupstudio export", "files": files}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _read_manifest(out_dir: Path) -> Optional[set]:
    """The file names a previous export wrote into ``out_dir`` (None: not an export)."""
    try:
        doc = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = doc["files"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not all(isinstance(n, str) and Path(n).name == n
                                              and n not in (".", "..") for n in files):
        return None
    return set(files) | {MANIFEST_NAME}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_target(out_dir: Path, names: list, overwrite: bool, inputs: list) -> Optional[set]:
    """What may be replaced in ``out_dir``: None when it is new or empty, else the names the
    previous export wrote there. Refuses before any work is done."""
    if any(_same_file(out_dir, p) for p in inputs):
        raise DupstudioError(f"{out_dir}: is an input of this export (the model folder); "
                             f"choose another output folder")
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise DupstudioError(f"{out_dir}: exists and is not a folder")
    if not any(out_dir.iterdir()):
        return None
    if not overwrite:
        raise DupstudioError(f"{out_dir}: already exists and is not empty (choose another folder "
                             f"or overwrite it)")
    old = _read_manifest(out_dir)
    if old is None:
        raise DupstudioError(f"{out_dir}: not a dupstudio export (no readable {MANIFEST_NAME}); "
                             f"--overwrite replaces only what dupstudio wrote, so choose an empty "
                             f"or new folder")
    for name in sorted(old | set(names)):
        p = out_dir / name
        if any(_same_file(p, q) for q in inputs):
            raise DupstudioError(f"{p}: is an input of this export; --overwrite would replace it "
                                 f"(choose another output folder)")
        if name not in old and (p.exists() or p.is_symlink()):
            raise DupstudioError(f"{p}: was not written by dupstudio; refusing to replace it")
    return old


def _move_into_place(tmp: Path, out_dir: Path, old: Optional[set]) -> None:
    """A new (or empty) folder: rename ``tmp`` into place. A previous export: replace its files
    one by one, leaving every other file in the folder alone. The manifest first lists the
    union of old and new names, so an interrupted replacement still knows what is dupstudio's."""
    if old is None:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
        return
    new = {f.name for f in tmp.iterdir()}
    atomic_write_bytes(out_dir / MANIFEST_NAME, _manifest({n: 0 for n in sorted(old | new)}))
    for name in sorted(new - {MANIFEST_NAME}):
        os.replace(tmp / name, out_dir / name)
    for name in sorted(old - new):
        try:
            (out_dir / name).unlink()
        except FileNotFoundError:
            pass
    os.replace(tmp / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    shutil.rmtree(tmp, ignore_errors=True)
