"""``dupstudio info [MODEL] [--json]``: describe a model (the default model when none is given)."""
from __future__ import annotations

import json
import sys
from typing import Optional

from dupstudio.core.units import human_bytes

HELP_MODEL = ("model folder (mlx-lm / Hugging Face), .gguf file or hub id; "
              "default: the bundled SmolLM2-135M-Instruct (converted once, then cached)")


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a model: architecture, blocks, parameters, sizes",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("model", nargs="?", default=None, help=HELP_MODEL)
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.add_argument("--blocks", action="store_true",
                   help="list every block's matrices (the table shows block 0 otherwise)")
    p.set_defaults(func=run)


class StderrProgress:
    """Progress callback writing to stderr: one updating line on a terminal; otherwise a line
    per message without a fraction, and one per 10% step."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._decile: Optional[int] = None
        self._open_line = False

    def __call__(self, fraction: Optional[float], message: str) -> None:
        pct = "" if fraction is None else f"{fraction * 100:3.0f}% "
        text = f"dupstudio: {pct}{message}"
        if self.tty:
            width = 100
            self.stream.write("\r" + text[:width].ljust(width))
            self._open_line = True
            if fraction is None or fraction >= 1.0:
                self.stream.write("\n")
                self._open_line = False
            self.stream.flush()
            return
        if fraction is not None:
            decile = int(fraction * 10)
            if decile == self._decile and fraction < 1.0:
                return
            self._decile = decile
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def human_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def format_description(d: dict, all_blocks: bool = False) -> str:
    lines = [
        f"model           {d['source']}",
        f"path            {d['path']}",
        f"architecture    {d['architecture']}",
        f"blocks          {d['num_blocks']}",
        f"hidden size     {d['hidden_size']}",
        f"intermediate    {d['intermediate_size']}",
        f"heads           {d['num_heads']} query, {d['num_kv_heads']} key/value, head dim {d['head_dim']}",
        f"vocabulary      {d['vocab_size']}",
        f"embeddings      {'tied (the head reuses the embedding)' if d['tied_embeddings'] else 'untied'}",
        f"parameters      {d['parameters']:,} ({human_params(d['parameters'])})",
        f"  decoder linears {d['linear_parameters']:,}  ({d['matrices_per_block']} matrices per block)",
        f"  embedding       {d['embedding_parameters']:,}",
        f"  head            {d['head_parameters']:,}",
        f"  norms           {d['norm_parameters']:,}",
        "",
    ]
    sizes = d["size_bytes"]
    rows = [[f"{b} bits", human_bytes(sizes[b]), f"{sizes[b]:,}"]
            for b in sorted(sizes, key=lambda s: -int(s))]
    lines += _table(rows, ["weights", "size", "bytes"], right={1, 2})
    lines += [f"({d['size_note']})", ""]
    blocks = d["blocks"] if all_blocks else d["blocks"][:1]
    mrows = []
    for b in blocks:
        for m in b["matrices"]:
            mrows.append([str(b["index"]), m["name"], f"{m['shape'][0]} x {m['shape'][1]}", f"{m['params']:,}"])
    lines += _table(mrows, ["block", "matrix", "out x in", "params"], right={0, 3})
    if not all_blocks and len(d["blocks"]) > 1:
        lines.append(f"(all {len(d['blocks'])} blocks have this layout; --blocks lists each)")
    return "\n".join(lines)


def run(args) -> int:
    from dupstudio.core.model_io import describe, open_model

    progress = StderrProgress()
    try:
        loaded = open_model(args.model, progress=progress)
    finally:
        progress.close()
    d = describe(loaded)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_description(d, all_blocks=args.blocks))
    return 0
