"""Writing ``auditor dora``'s results: ``dora.json`` and the outliers' s-AMS as PNG files.

Written into a staging folder next to ``out`` and moved into place at the end, so a
failed run leaves ``out`` as it was.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..results import DoraResult, _clean


def summary_lines(result: DoraResult, top: int = 10) -> list[str]:
    lines = []
    for lyr in result.layers:
        lines.append(f"# {lyr.name}: {len(lyr.outliers)} outlier neuron(s) of {lyr.n_neurons} "
                     f"({result.method} on the {result.distance} EA distance)")
        lines.append("rank  neuron  score   outlier")
        for n in sorted(lyr.neurons, key=lambda n: n.rank)[:max(top, len(lyr.outliers))]:
            lines.append(f"{n.rank:>4}  {n.index:>6}  {n.score:7.3f}  {'yes' if n.outlier else ''}")
    return lines


def write_dora(result: DoraResult, out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.parent.resolve().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.resolve().parent))
    try:
        (staging / "dora.json").write_text(json.dumps(_clean(result.to_dict()), indent=1, allow_nan=False),
                                           encoding="utf-8")
        for li, lyr in enumerate(result.layers):
            for n in lyr.neurons:
                for s, uri in enumerate(n.sams):
                    folder = staging / "sams" / f"{li:02d}-{_safe(lyr.name)}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"neuron{n.index:05d}-rank{n.rank:05d}-s{s}.png").write_bytes(
                        base64.b64decode(uri.split(",", 1)[1]))
        out.mkdir(exist_ok=True)
        if (out / "sams").exists():
            shutil.rmtree(out / "sams")
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        return out / "dora.json"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
