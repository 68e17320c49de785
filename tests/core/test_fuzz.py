"""Property-based fuzzing of everything dupstudio parses from a file: GGUF headers, safetensors
headers (through a model folder) and configuration JSON.

Hypothesis draws mutations of real small inputs (a tiny convertible GGUF, a tiny model folder,
a tiny configuration); the parent applies them and hands a batch of inputs to a child process
that runs the real entry point on each under a memory limit (RLIMIT_AS) and a time limit. Every
input must end in success or in a one-line DupstudioError: a traceback, a crash, running out of
memory or time fails the test and names the input. Batches keep the number of interpreter
starts small (the whole module runs in well under two minutes on 2 cores).

Run this file as a script (``python test_fuzz.py KIND CASES.pkl``) to be the child.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

MEMORY_LIMIT = 2 << 30  # bytes of address space for the child (a parse must never need more)
CASE_SECONDS = 10.0  # one input
BATCH = 100  # inputs per child process
EXAMPLES = 5  # batches per format: 500 inputs each


# =========================================================================== the child
def _child_gguf(data: bytes, work: Path, i: int) -> None:
    from dupstudio.core import gguf

    p = work / f"case{i}.gguf"
    p.write_bytes(data)
    gguf.read_gguf_info(p)
    out = gguf.convert_gguf(p, work / f"out{i}")
    from dupstudio.core.model_io import check_model_dir

    check_model_dir(out)


def _child_safetensors(data: bytes, work: Path, i: int) -> None:
    from dupstudio.core.model_io import open_model

    (work / "model" / "model.safetensors").write_bytes(data)
    open_model(work / "model")


def _child_config(text: str, work: Path, i: int) -> None:
    from dupstudio.core import config as C
    from dupstudio.core.replicate import accounting

    shape = json.loads((work / "shape.json").read_text())
    cfg = C.loads(text, work, shape)
    C.loads(C.dumps(cfg), work, shape)  # what loaded saves again
    accounting(cfg, shape)


def _child_main(kind: str, cases_file: str) -> None:
    """Run every case; one JSON line per case on stdout: ``start`` before, the outcome after."""
    import resource
    import tempfile
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from dupstudio.core.jobs import DupstudioError

    with open(cases_file, "rb") as f:
        setup, cases = pickle.load(f)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for name, data in setup.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    run = {"gguf": _child_gguf, "safetensors": _child_safetensors, "config": _child_config}[kind]
    emit = sys.__stdout__
    for i, case in enumerate(cases):
        print(json.dumps({"start": i}), file=emit, flush=True)
        t0 = time.perf_counter()
        try:
            run(case, work, i)
            res = {"ok": True}
        except DupstudioError as e:
            res = {"error": str(e)}
        except BaseException as e:  # noqa: BLE001 - every other outcome is the bug we look for
            res = {"bad": f"{type(e).__name__}: {e}"[:500],
                   "where": "".join(traceback.format_exc().splitlines(True)[-6:])[:2000]}
        res.update(case=i, seconds=time.perf_counter() - t0)
        print(json.dumps(res), file=emit, flush=True)


# =========================================================================== the parent
def run_batch(kind: str, setup: dict, cases: list, tmp: Path) -> list:
    """Run ``cases`` in a child; return the outcome dicts. Fails naming the case that crashed
    the child or ran out of time."""
    cases_file = tmp / f"{kind}-{time.monotonic_ns()}.pkl"
    cases_file.write_bytes(pickle.dumps((setup, cases)))
    env = dict(os.environ, DUPSTUDIO_HOME=str(tmp / "home"), PYTHONHASHSEED="0")
    try:
        r = subprocess.run([sys.executable, __file__, kind, str(cases_file)], capture_output=True,
                           text=True, env=env, timeout=CASE_SECONDS * len(cases) / 4 + 60)
        stdout, code = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    results, started = [], None
    for line in stdout.splitlines():
        d = json.loads(line)
        if "start" in d:
            started = d["start"]
        else:
            results.append(d)
    if len(results) != len(cases):
        bad = cases[started] if started is not None else None
        (tmp / f"crash-{kind}.bin").write_bytes(bad if isinstance(bad, bytes) else str(bad).encode())
        raise AssertionError(f"{kind}: the child ended ({code}) at case {started} "
                             f"(saved in {tmp}/crash-{kind}.bin): {str(bad)[:300]!r}")
    return results


def check_results(kind: str, cases: list, results: list) -> dict:
    counts = {"ok": 0, "error": 0}
    for res in results:
        case = cases[res["case"]]
        assert "bad" not in res, f"{kind} case {case!r:.300}: {res['bad']}\n{res['where']}"
        assert res["seconds"] < CASE_SECONDS, f"{kind} case took {res['seconds']:.1f} s: {case!r:.300}"
        if "error" in res:
            msg = res["error"]
            assert msg and "\n" not in msg and "Traceback" not in msg, f"{kind}: {msg!r}"
            counts["error"] += 1
        else:
            counts["ok"] += 1
    TOTALS.setdefault(kind, {"ok": 0, "error": 0})
    for k, v in counts.items():
        TOTALS[kind][k] += v
    return counts


TOTALS: dict = {}

if __name__ == "__main__":  # the child
    _child_main(sys.argv[1], sys.argv[2])
    sys.exit(0)

# --------------------------------------------------------------------------- strategies
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dupstudio.core import testing as T  # noqa: E402

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing input is printed
                suppress_health_check=list(HealthCheck))

INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 127, 255, 256, 1000, 4096, 65535,
                    2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 4_000_000_000, 2 ** 62, 2 ** 63 - 1,
                    2 ** 63, 2 ** 64 - 1]
interesting_int = st.sampled_from(INTERESTING_INTS) | st.integers(0, 2 ** 64 - 1)


def raw_mutation(limit: int):
    """(op, offset, value) on the first ``limit`` bytes: set a byte, write a little-endian
    u32/u64, cut the file, insert or delete bytes."""
    off = st.integers(0, max(limit - 1, 0))
    return st.one_of(
        st.tuples(st.just("byte"), off, st.integers(0, 255)),
        st.tuples(st.just("u32"), off, interesting_int.map(lambda v: v & 0xFFFFFFFF)),
        st.tuples(st.just("u64"), off, interesting_int),
        st.tuples(st.just("cut"), off, st.just(0)),
        st.tuples(st.just("insert"), off, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), off, st.integers(1, 16)),
    )


def apply_raw(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for op, off, val in muts:
        off = min(off, len(b))
        if op == "byte" and off < len(b):
            b[off] = val
        elif op in ("u32", "u64"):
            raw = struct.pack("<I" if op == "u32" else "<Q", val)
            b[off:off + len(raw)] = raw
        elif op == "cut":
            del b[off:]
        elif op == "insert":
            b[off:off] = val
        elif op == "delete":
            del b[off:off + val]
    return bytes(b)


# --------------------------------------------------------------------------- GGUF
GGUF_KVS, GGUF_TENSORS = T.tiny_gguf_parts()
GGUF_HEADER_LEN = len(T.gguf_bytes(GGUF_KVS, [(n, a.reshape(-1)[:0]) for n, a in GGUF_TENSORS]))

gguf_value = st.one_of(
    st.tuples(st.just(T.GGUF_U32), interesting_int.map(lambda v: v & 0xFFFFFFFF)),
    st.tuples(st.just(T.GGUF_F32), st.floats(width=32)),
    st.tuples(st.just(T.GGUF_STRING), st.text(max_size=12)),
    st.tuples(st.just(T.GGUF_ARRAY), st.tuples(st.just(T.GGUF_U32), st.lists(st.integers(0, 2 ** 32 - 1), max_size=4))),
    st.tuples(st.just(T.GGUF_ARRAY), st.tuples(st.just(T.GGUF_STRING), st.lists(st.text(max_size=4), max_size=4))),
    st.tuples(st.just(T.GGUF_ARRAY), st.tuples(st.just(T.GGUF_ARRAY), st.just([(T.GGUF_U32, [1, 2])]))),
)
gguf_field = st.one_of(
    st.tuples(st.just("set"), st.sampled_from([k for k, _, _ in GGUF_KVS] + ["general.alignment",
                                                                            "llama.attention.key_length",
                                                                            "llama.vocab_size"]), gguf_value),
    st.tuples(st.just("drop_key"), st.integers(0, len(GGUF_KVS) - 1), st.just(None)),
    st.tuples(st.just("drop_tensor"), st.integers(0, len(GGUF_TENSORS) - 1), st.just(None)),
    st.tuples(st.just("reshape"), st.integers(0, len(GGUF_TENSORS) - 1), st.sampled_from([(0,), (1, 64), (64, 1), (2, 2, 16)])),
    st.tuples(st.just("rename"), st.integers(0, len(GGUF_TENSORS) - 1), st.sampled_from(["blk.9.attn_q.weight", "blk.01.attn_q.weight", "x", ""])),
)
gguf_case = st.tuples(st.lists(gguf_field, max_size=2), st.lists(raw_mutation(GGUF_HEADER_LEN), max_size=3))


def build_gguf(case) -> bytes:
    import numpy as np

    fields, raws = case
    kvs, tensors = list(GGUF_KVS), list(GGUF_TENSORS)
    for op, a, b in fields:
        if op == "set":
            kvs = [kv for kv in kvs if kv[0] != a] + [(a, *b)]
        elif op == "drop_key" and a < len(kvs):
            del kvs[a]
        elif op == "drop_tensor" and a < len(tensors):
            del tensors[a]
        elif op == "reshape" and a < len(tensors):
            tensors[a] = (tensors[a][0], np.zeros(b))
        elif op == "rename" and a < len(tensors):
            tensors[a] = (b, tensors[a][1])
    return apply_raw(T.gguf_bytes(kvs, tensors), raws)


@pytest.fixture(scope="module")
def fuzz_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(st.lists(gguf_case, min_size=BATCH, max_size=BATCH))
def test_fuzz_gguf_headers(fuzz_tmp, cases):
    inputs = [build_gguf(c) for c in cases]
    check_results("gguf", cases, run_batch("gguf", {}, inputs, fuzz_tmp))


# --------------------------------------------------------------------------- safetensors
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = T.make_tiny_llama(tmp_path_factory.mktemp("fuzz-model") / "m", layers=1, hidden=64,
                          intermediate=128)
    return {f"model/{p.name}": p.read_bytes() for p in d.iterdir() if p.is_file()}


def _split_safetensors(data: bytes) -> tuple:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


json_scalar = st.one_of(st.none(), st.booleans(), interesting_int, st.integers(-2 ** 63, -1),
                        st.floats(), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
st_field = st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["dtype", "shape", "data_offsets", "drop",
                                                               "shape[0]", "data_offsets[1]", "rename"]),
                     json_value)
st_case = st.tuples(st.lists(st_field, max_size=2), st.lists(raw_mutation(4096), max_size=2))


def build_safetensors(base: bytes, case) -> bytes:
    fields, raws = case
    header, data = _split_safetensors(base)
    names = sorted(k for k in header if k != "__metadata__")
    for pick, what, value in fields:
        name = names[pick % len(names)]
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if what == "drop":
            header.pop(name)
        elif what == "rename":
            header[str(value)[:40]] = header.pop(name)
        elif what.endswith("]"):
            key = what[:-3]
            if isinstance(entry.get(key), list) and entry[key]:
                entry[key][-1 if key == "data_offsets" else 0] = value
        else:
            entry[what] = value
    raw = json.dumps(header).encode()
    return apply_raw(struct.pack("<Q", len(raw)) + raw + data, raws)


@FUZZ
@given(st.lists(st_case, min_size=BATCH, max_size=BATCH))
def test_fuzz_safetensors_headers(fuzz_tmp, model_files, cases):
    base = model_files["model/model.safetensors"]
    inputs = [build_safetensors(base, c) for c in cases]
    check_results("safetensors", cases, run_batch("safetensors", model_files, inputs, fuzz_tmp))


# --------------------------------------------------------------------------- configuration JSON
@pytest.fixture(scope="module")
def config_base(tiny_loaded):
    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape

    shape = model_shape(tiny_loaded.config)
    cfg = C.new_config(shape, replicas=2, mode="parallel", layers=[0, 2], init="gamma",
                       strategy="percentile", strategy_args={"p": 99.0})
    cfg.blocks[1].bits, cfg.blocks[1].group_size = 3, 32
    cfg.blocks[0].calibration = {"loss_before": 1.0, "loss_after": 0.5, "accepted": True}
    return cfg.to_dict(), {"shape.json": json.dumps(shape).encode()}


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


cfg_field = st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["set", "drop", "add"]), json_value)
cfg_case = st.tuples(st.lists(cfg_field, min_size=1, max_size=3), st.lists(raw_mutation(3000), max_size=1))


def build_config(base: dict, case) -> str:
    import copy

    fields, raws = case
    d = copy.deepcopy(base)
    for pick, op, value in fields:
        paths = [p for p in _paths(d) if p]
        path = paths[pick % len(paths)]
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "set":
            parent[key] = value
        elif op == "drop":
            parent.pop(key) if isinstance(parent, dict) else parent.pop(key)
        elif isinstance(parent, dict):
            parent[f"x{pick % 7}"] = value
        else:
            parent.append(value)
    text = json.dumps(d)
    return apply_raw(text.encode(), raws).decode("utf-8", errors="replace") if raws else text


@FUZZ
@given(st.lists(cfg_case, min_size=BATCH, max_size=BATCH))
def test_fuzz_configuration_json(fuzz_tmp, config_base, cases):
    base, setup = config_base
    inputs = [build_config(base, c) for c in cases]
    check_results("config", cases, run_batch("config", setup, inputs, fuzz_tmp))


def test_fuzz_counts():
    """Runs after the three fuzz tests (file order): each format saw at least 500 inputs, and
    both outcomes occurred (the mutations reach past the first check)."""
    if len(TOTALS) < 3:
        pytest.skip("run the whole module to count")
    for kind, c in TOTALS.items():
        assert c["ok"] + c["error"] >= BATCH * EXAMPLES, (kind, c)
        assert c["error"] > 0 and c["ok"] > 0, (kind, c)
    print(f"fuzz totals: {TOTALS}")
