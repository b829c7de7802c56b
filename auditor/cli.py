"""Command-line interface: thin commands that parse, call the pipeline, map errors.

Exit codes (a contract): 0 the audit ran and no gate the user has on failed (always for
``demo``); 1 a gate failed: neurons were flagged (``--fail-on-flag``, on by default for
``run`` and ``explain``), an artifact test was inconclusive (``--fail-on-inconclusive``) or
an artifact's flip rate exceeded ``--fail-on-impact``, with stderr and junit.xml saying
which; 2 the audit could not run, with one line on stderr naming the bad input — or any
other failure (a full disk, a read-only folder, a bug: ``--debug`` shows the traceback);
130 interrupted by Ctrl-C; 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AuditorError

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def _err(msg: str) -> None:
    print(f"auditor: error: {msg}", file=sys.stderr, flush=True)


def _info(msg: str) -> None:
    print(f"auditor: {msg}", file=sys.stderr, flush=True)


# -- config fields as flags -------------------------------------------------------

def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from .config import FIELDS

    groups: dict[str, argparse._ArgumentGroup] = {}
    sections = {
        "model": "model", "weights": "model", "layer": "model",
        "resize": "preprocessing", "crop": "preprocessing", "mean": "preprocessing", "std": "preprocessing",
        "normalize": "preprocessing",
        "images": "probe data", "labels": "probe data", "artifacts": "probe data", "on_bad_image": "probe data",
        "labels_format": "probe data", "hierarchy": "probe data", "synth": "probe data",
        "length": "INVERT search", "beam": "INVERT search", "min_fraction": "INVERT search",
        "max_fraction": "INVERT search", "limit_search": "INVERT search", "heldout": "INVERT search",
        "seed": "INVERT search", "bootstrap": "INVERT search",
        "flag_max_p": "flagging", "flag_min_effect": "flagging", "flag_strong_effect": "flagging",
        "flag_min_artifact_rows": "flagging", "flag_strata": "flagging", "calibration_runs": "flagging",
        "fail_on_flag": "flagging", "fail_on_inconclusive": "flagging",
        "dora": "DORA",
        "impact": "impact on the outputs", "impact_count": "impact on the outputs",
        "impact_seed": "impact on the outputs", "impact_params": "impact on the outputs",
        "output": "impact on the outputs", "class_names": "impact on the outputs",
        "ablation": "impact on the outputs", "ablation_draws": "impact on the outputs",
        "fail_on_impact": "impact on the outputs", "save_pairs": "impact on the outputs",
    }
    for name, info in FIELDS.items():
        if name in skip:
            continue
        section = sections.get(name, "collection and output")
        group = groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + name.replace("_", "-")
        default = info.default
        helptext = (info.description or "") + (f" (default: {_show(default)})" if default not in (None, ()) else "")
        ann = info.annotation
        if ann is bool and name.startswith("no_"):
            group.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=helptext)
            continue
        if ann is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=helptext)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": helptext, "metavar": name.upper()}
        base = _base_type(ann)
        if typing.get_origin(base) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(base))
            kwargs.pop("metavar")
        elif base in (int, float):
            kwargs["type"] = base
        group.add_argument(flag, **kwargs)
    _add_replaced_flags(parser)


def _add_replaced_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the old rule, hidden: given, they fail with a message naming what replaced them."""
    from .flags import REPLACED_KEYS

    for name in REPLACED_KEYS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)


def _base_type(ann: Any) -> Any:
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return ann


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _explain_flags(parser: argparse.ArgumentParser) -> None:
    """The search and flag settings of ``run``, with the same defaults (from AuditConfig)."""
    from .explain_cli import EXPLAIN_KEYS

    _add_config_flags(parser, skip=tuple(k for k in __import__("auditor.config", fromlist=["FIELDS"]).FIELDS
                                         if k not in EXPLAIN_KEYS or k == "hierarchy"))


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    from .config import FIELDS

    from .flags import REPLACED_KEYS

    return {k: v for k, v in vars(ns).items() if (k in FIELDS or k in REPLACED_KEYS) and v is not None}


# -- commands ------------------------------------------------------------------------

def impact_exceeded(result, threshold: float | None) -> list[str]:
    """Artifacts whose flip rate is above ``threshold`` (the --fail-on-impact gate)."""
    if threshold is None:
        return []
    return [imp.artifact for imp in getattr(result, "impact", []) or []
            if imp.flip_rate is not None and imp.flip_rate > threshold]


def finish(result, written: dict[str, Path], fail_on_flag: bool, fail_on_inconclusive: bool = False,
           fail_on_impact: float | None = None) -> int:
    """Print the verdict per artifact and the outputs; return the exit code (0, or 1 when a gate failed)."""
    summary = result.summary()
    for art, info in summary.items():
        flagged = [f"{layer}#{idx}" for layer, idx in info["flagged"]]
        verdict = f"{len(flagged)} neuron(s) flagged" + (f" ({', '.join(flagged[:8])}{' …' if len(flagged) > 8 else ''})"
                                                         if flagged else "")
        extra = f"; {len(info['near_miss'])} near miss(es); {len(info['inconclusive'])} inconclusive"
        if info["sensitive"]:
            extra += f"; {len(info['sensitive'])} artifact-sensitive"
        _info(f"{art}: {verdict}{extra}")
    cal = getattr(result, "calibration", None)
    if cal:
        _info(f"calibration: with the artifact labels permuted, the same rule raised {cal['mean_flags']:.1f} "
              f"flag(s) on average (max {cal['max_flags']}) over {cal['runs']} runs, against "
              f"{cal['real_flags']} here")
    for imp in getattr(result, "impact", []) or []:
        _info(f"impact: {imp.summary}")
    if "html" in written:
        _info(f"report: {written['html']}")
    for fmt, path in written.items():
        if fmt != "html":
            _info(f"{fmt}: {path}")
    failed = []
    if fail_on_flag and result.n_flagged:
        failed.append(f"fail_on_flag: {result.n_flagged} neuron(s) flagged")
    n_inc = sum(len(v["inconclusive"]) for v in summary.values())
    if fail_on_inconclusive and n_inc:
        failed.append(f"fail_on_inconclusive: {n_inc} inconclusive (neuron, artifact) test(s)")
    exceeded = impact_exceeded(result, fail_on_impact)
    if exceeded:
        _info(f"flip rate above --fail-on-impact {fail_on_impact:g} for: {', '.join(exceeded)}")
        failed.append(f"fail_on_impact: flip rate above {fail_on_impact:g} for {', '.join(exceeded)}")
    for gate in failed:
        _info(f"gate failed: {gate} (exit code 1)")
    return EXIT_FLAGGED if failed else EXIT_OK


_finish = finish


def cmd_run(ns: argparse.Namespace) -> int:
    # A thin layer over the Python API: auditor.api.audit_config + AuditResult.save.
    from .api import audit_config
    from .config import load_config

    cfg = load_config(ns.config, _overrides(ns))
    result = audit_config(cfg, progress=not ns.quiet)
    if result is None:  # worker rank of a torchrun launch: rank 0 writes the report
        return EXIT_OK
    written = result.save(cfg.out, formats=cfg.formats)
    return finish(result, written, cfg.fail_on_flag, cfg.fail_on_inconclusive, cfg.fail_on_impact)


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo.run import demo_config
    from .pipeline import run_audit, write_outputs

    cfg = demo_config(out=ns.out, device=ns.device, cache_dir=ns.cache_dir, n_images=ns.images,
                      formats=ns.formats, log=_info)
    if ns.dora:
        from .config import DoraSection

        cfg = cfg.model_copy(update={"dora": DoraSection()})
    result = run_audit(cfg, progress=not ns.quiet)
    written = write_outputs(result, cfg.out, cfg.formats)
    _finish(result, written, fail_on_flag=False)
    return EXIT_OK


def cmd_layers(ns: argparse.Namespace) -> int:
    import fnmatch

    import torch

    from .models import layer_shapes, load_model

    loaded = load_model(ns.model, ns.weights)
    size = ns.input_size or loaded.default_preprocessing.crop or 224
    sample = torch.zeros(1, 3, size, size)
    rows = layer_shapes(loaded.module, sample)
    total = len(rows)
    if ns.filter:
        pattern = ns.filter if any(c in ns.filter for c in "*?[") else f"*{ns.filter}*"
        rows = [r for r in rows if fnmatch.fnmatchcase(r.name, pattern) or fnmatch.fnmatchcase(r.type, pattern)]
    width = max((len(r.name) for r in rows), default=10)
    tw = max((len(r.type) for r in rows), default=10)
    sw = max((len("×".join(str(s) for s in r.shape) if r.shape else "-") for r in rows), default=1)
    shown = f"{len(rows)} of {total} layers matching {ns.filter!r}" if ns.filter else f"{total} layers"
    print(f"# {loaded.spec}: output shapes for one 3x{size}x{size} input (per sample); {shown}")
    reused = sorted({r.name for r in rows if r.calls > 1 and not r.note.startswith("call ")})
    if reused:
        print(f"# {len(reused)} module(s) run more than once per forward pass (marked 'runs N×'): the bare name is "
              "the first call, NAME_1 the second, …")
    for r in rows:
        shape = "×".join(str(s) for s in r.shape) if r.shape else "-"
        line = f"{r.name:<{width}}  {r.type:<{tw}}  {shape:<{sw}}"
        print((line + f"  {r.note}" if r.note else line).rstrip())
    return EXIT_OK


def cmd_render(ns: argparse.Namespace) -> int:
    from .pipeline import write_outputs
    from .results import AuditResult

    result = AuditResult.load(ns.results)
    formats = tuple(f for f in ns.formats.split(",") if f) if ns.formats else ("html", "pdf", "csv", "junit")
    written = write_outputs(result, ns.out, formats)
    for fmt, path in written.items():
        _info(f"{fmt}: {path}")
    return EXIT_OK


def cmd_synth(ns: argparse.Namespace) -> int:
    from .synth import parse_params, synthesise

    from .errors import ConfigError

    if ns.count is not None and ns.fraction is not None:
        raise ConfigError("give --count or --fraction, not both (--count M pastes each artifact on M clean images)")
    made = synthesise(ns.images, ns.labels, ns.out, artifacts=[a.strip() for a in ns.artifacts.split(",") if a.strip()],
                      fraction=ns.fraction if ns.fraction is not None else "0.5", count=ns.count,
                      seed=ns.seed, params=parse_params(ns.param),
                      labels_format=ns.labels_format, plugins=ns.plugin, overwrite=ns.overwrite,
                      link_clean=ns.link_clean, log=_info, progress=not ns.quiet)
    _info(f"labels: {made.labels}")
    _info(f"audit it with: {made.run_hint()}")
    return EXIT_OK


def cmd_dora(ns: argparse.Namespace) -> int:
    from .config import load_config
    from .dora.output import summary_lines, write_dora
    from .pipeline import run_dora_only

    cfg = load_config(ns.config, _overrides(ns))
    result = run_dora_only(cfg, log=_info, progress=not ns.quiet)
    written = write_dora(result, cfg.out if "out" in cfg.model_fields_set else "auditor-dora")
    for line in summary_lines(result):
        print(line)
    _info(f"results: {written}")
    return EXIT_OK


def cmd_explain(ns: argparse.Namespace) -> int:
    from .explain_cli import run_explain

    return run_explain(ns)


def cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare_results, load_result

    old, old_path = load_result(ns.old)
    new, new_path = load_result(ns.new)
    cmp = compare_results(old, new, match=ns.match, old_source=old_path, new_source=new_path)
    for line in cmp.differences:
        _info(f"WARNING: {line}")
    written = cmp.save(ns.out, ns.formats)
    for line in cmp.summary_lines():
        _info(line)
    for fmt, path in written.items():
        _info(f"{fmt}: {path}")
    if ns.fail_on_new and cmp.n_new:
        return EXIT_FLAGGED
    return EXIT_OK


def cmd_history(ns: argparse.Namespace) -> int:
    import json

    from .errors import ConfigError
    from .history import History, format_table, resolve_history_path

    if ns.history and ns.history_path and ns.history != ns.history_path:
        raise ConfigError("give the history once: as PATH or as --history PATH")
    path = resolve_history_path(ns.history or ns.history_path)
    with History(path, create=False) as hist:
        rows = hist.rows(checkpoint=ns.checkpoint, artifact=ns.artifact, flagged_only=ns.flagged,
                         since=ns.since, source=ns.source, limit=ns.limit)
    if ns.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows) if rows else f"# no audits in {path} match")
    return EXIT_OK


def cmd_watch(ns: argparse.Namespace) -> int:
    from filelock import Timeout

    from .config import load_config
    from .errors import ConfigError
    from .watch import Watcher, WatchErrors

    cfg = load_config(ns.config, {})
    formats = tuple(f.strip() for f in ns.formats.split(",") if f.strip()) if ns.formats else None
    watcher = Watcher(ns.dir, cfg, reports=ns.out, history=ns.history, formats=formats, log=_info,
                      progress=not ns.quiet)
    try:
        with watcher.lock(timeout=ns.lock_timeout):
            if not ns.once:
                _info(f"watching {watcher.folder} every {ns.interval:g} s (Ctrl-C stops); reports in {watcher.reports}")
                watcher.run(interval=ns.interval)
                return EXIT_OK
            try:
                done = watcher.run_once()
            except WatchErrors as exc:
                _err(str(exc))
                return EXIT_ERROR
    except Timeout:
        msg = f"another auditor watch holds {watcher.lock_path}"
        if ns.once:
            _info(f"{msg}; it audits the pending checkpoints, so this run does nothing")
            return EXIT_OK
        raise ConfigError(f"{msg}; one watcher per folder (stop the other, or wait with --lock-timeout)") from None
    _info(f"{len(done)} checkpoint(s) audited; index: {watcher.reports / 'index.html'}")
    if ns.fail_on_new and any(d.n_new for d in done):
        return EXIT_FLAGGED
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------

def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; ``only`` = the command about to run: the other commands' option
    lists, which need the config schema (pydantic) and the artifact registry, are left out
    so that a quick command starts quickly."""
    parser = argparse.ArgumentParser(
        prog="auditor",
        description="Audit a trained PyTorch image model neuron by neuron: INVERT explanations, "
                    "artifact (Clever Hans) flags, HTML/PDF reports.")
    parser.add_argument("--version", action="version", version=f"auditor {__version__}")
    debug_help = "on an error, print the traceback too (or set AUDITOR_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="audit the embedded demo model (no inputs needed) and write a report",
                       description="Build the embedded demo (a small CNN with a planted watermark shortcut and a "
                                   "synthetic probe set with artifact concepts), audit it and write the report.")
    p.add_argument("--out", default="auditor-demo", help="output folder (default: auditor-demo)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cache-dir", default=None, help="activation and demo-data cache (default: user cache)")
    p.add_argument("--images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--formats", default=None, help="comma-separated outputs (default: html,pdf,json,csv,junit)")
    p.add_argument("--dora", action="store_true", help="also run DORA (outlier neurons from synthetic images; "
                   "a few minutes on a CPU, see docs/dora.md)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="audit a model (YAML config and/or flags; flags win)",
                       description="Audit one layer of a model on a labeled probe set. Every config key can be "
                                   "given as a flag (dashes) or in the YAML file (underscores); flags win.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    if only in (None, "run"):
        _add_config_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("dora", help="DORA: outlier neurons from synthetic activation-maximisation images (no labels)",
                       description="Synthesise images that maximally activate every neuron of the layer (s-AMS), "
                                   "feed them back, and list the neurons whose representations sit far from the "
                                   "rest (Extreme-Activation distance + outlier scores). Writes OUT/dora.json and "
                                   "the outliers' s-AMS as PNG files (default OUT: auditor-dora). Settings: the "
                                   "dora: section of the config or --dora '{steps: 90, signals: 3}'. "
                                   "See docs/dora.md.")
    p.add_argument("config", nargs="?", default=None, help="YAML config file (an audit config works)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)
    p.set_defaults(func=cmd_dora)

    p = sub.add_parser("layers", help="list a model's layer names with output shapes")
    p.add_argument("model", help="torchvision name, package.module:callable, file.py:callable or TorchScript file")
    p.add_argument("filter", nargs="?", default=None, help="show only layers whose name or type contains this text "
                   "(or matches this glob: 'encoder.layers.*.mlp')")
    p.add_argument("--weights", default=None)
    p.add_argument("--input-size", type=int, default=None, help="side of the sample input (default: the "
                   "model's crop size or 224)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("explain", help="run INVERT on saved activations (no model needed)",
                       description="Explain every neuron of saved activations (N×K .npy/.pt) with concept labels "
                                   "(CSV, Parquet or .npz; rows matched to activation rows by order).")
    p.add_argument("--activations", required=True, help="N×K activations: .npy or .pt")
    p.add_argument("--labels", required=True, help="labels: .csv, .parquet or .npz (rows in activation order)")
    p.add_argument("--out", default="auditor-explain", help="output folder")
    p.add_argument("--artifacts", default="", help="artifact concept names, comma-separated")
    p.add_argument("--hierarchy", default=None, help="concept hierarchy (JSON or CSV): every ancestor of a concept "
                   "becomes a concept, and an artifact's ancestors count as the artifact")
    _explain_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--neurons", default=None, metavar="SPEC",
                   help="explain only these neurons: indices and start:stop ranges, e.g. 0:64,100 (default: all)")
    p.add_argument("--layer-name", default="activations", help="name shown for the layer in the report")
    p.add_argument("--formats", default="json,csv", help="outputs (default json,csv; add html,pdf for a report)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("synth", help="write copies of clean probe images carrying artifacts, with labels `run` reads",
                       description="Paste artifacts (watermark, text, border, timestamp or plugin generators) onto a "
                                   "fraction of clean probe images. Writes OUT/images/clean/ (the originals), "
                                   "OUT/images/<artifact>/ (the copies) and OUT/labels.csv, where each copy names "
                                   "its clean source so the audit can compare each pair. Same seed, same bytes.")
    p.add_argument("--images", required=True, help="folder of clean probe images")
    p.add_argument("--labels", default=None, help="their labels in any format `run` reads (optional)")
    p.add_argument("--labels-format", default="auto",
                   choices=["auto", "wide", "long", "folders", "coco", "npz"])
    p.add_argument("--out", required=True, help="output folder (not inside --images)")
    p.add_argument("--artifacts", required=True,
                   help="generators, comma-separated (registered: "
                        f"{', '.join(_available_artifacts()) if only in (None, 'synth') else '…'})")
    p.add_argument("--fraction", default=None, help="fraction of the clean images that get each artifact, or per "
                   "artifact: watermark=0.5,text=0.2 (default 0.5)")
    p.add_argument("--count", type=int, default=None, metavar="M",
                   help="instead of --fraction: paste each artifact on M images that carry no artifact concept "
                        "(all of them if fewer) — the images `auditor run`'s impact test uses with the same "
                        "--seed and parameters")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--param", action="append", default=[], metavar="ARTIFACT.NAME=VALUE",
                   help="generator parameter, repeatable, value as YAML: watermark.opacity=0.5, "
                        "watermark.text=SAMPLE, border.width=[0.05,0.1]")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import a module that registers more generators (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synth output in --out")
    p.add_argument("--link-clean", action="store_true", help="hard-link the originals instead of copying them")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("render", help="re-render reports from a saved results.json (no model, data or torch)")
    p.add_argument("results", help="results.json written by an earlier audit")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default=None, help="comma-separated (default: html,pdf,csv,junit)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("compare", help="what changed between two audits: newly / no longer / still flagged neurons",
                       description="Compare two audits (results.json files or output folders), per artifact: "
                                   "neurons newly flagged, no longer flagged and still flagged, with their "
                                   "explanations. Threshold, rule and probe-set differences are stated first.")
    p.add_argument("old", help="the earlier audit: results.json or its output folder")
    p.add_argument("new", help="the later audit: results.json or its output folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--match", choices=["index", "activations"], default="index",
                   help="match neurons by index (fine-tuned checkpoints; default) or by activation correlation "
                        "on the shared probe set (retrained models; needs both activation caches)")
    p.add_argument("--formats", default="html,pdf,json,junit", help="comma-separated (default: html,pdf,json,junit)")
    p.add_argument("--fail-on-new", action="store_true", help="exit 1 when a neuron is newly flagged")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("history", help="list the audits recorded by `auditor watch` and the training callbacks",
                       description="List the audit history (SQLite), oldest first: checkpoint, sha256, time, "
                                   "flag counts per artifact, results file.")
    p.add_argument("history", nargs="?", default=None,
                   help="history file, the reports folder holding history.sqlite, or the watched folder "
                        "(default: reports/)")
    p.add_argument("--history", dest="history_path", default=None, metavar="PATH", help="the same, as an option")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    p.add_argument("--checkpoint", default=None, metavar="GLOB", help="only checkpoints whose name or path match")
    p.add_argument("--artifact", default=None, help="only audits that checked this artifact")
    p.add_argument("--flagged", action="store_true", help="only audits with flagged neurons (for --artifact: "
                   "flagged for it)")
    p.add_argument("--since", default=None, metavar="ISO-TIME", help="only audits at or after this UTC time "
                   "(e.g. 2025-01-31 or 2025-01-31T12:00)")
    p.add_argument("--source", choices=["watch", "lightning", "transformers", "api"], default=None)
    p.add_argument("--limit", type=int, default=None, help="only the last N rows")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("watch", help="audit every new checkpoint in a folder, compare it with the previous one",
                       description="Audit each new complete checkpoint (*.pt, *.pth, *.safetensors) in DIR, in "
                                   "mtime-then-name order: reports/<checkpoint>/ with a comparison against the "
                                   "previous checkpoint, reports/index.html with a timeline per artifact, and a "
                                   "row per audit in the history. Safe to stop and restart.")
    p.add_argument("dir", help="folder the training job writes checkpoints into")
    p.add_argument("--config", required=True, help="audit YAML (model, layer, images, labels, artifacts, ...); "
                   "its weights and out are set per checkpoint")
    p.add_argument("--once", action="store_true", help="audit what is pending and exit (cron, CI)")
    p.add_argument("--out", default=None, help="reports folder (default: DIR/reports)")
    p.add_argument("--history", default=None, help="history database (default: <reports>/history.sqlite)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between passes (default 60)")
    p.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for another watcher of the "
                   "same history to finish (default 0)")
    p.add_argument("--formats", default=None, help="report formats (default: the config's)")
    p.add_argument("--fail-on-new", action="store_true", help="with --once: exit 1 when an audited checkpoint has "
                   "neurons flagged that the previous one did not")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_watch)

    for p in sub.choices.values():  # `auditor run --debug …` works as well as `auditor --debug run …`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _available_artifacts() -> list[str]:
    from .artifacts import available_artifacts

    return available_artifacts()


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that reached the CLI: what happened, the path, what to do."""
    where = f" {exc.filename}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what} writing{where or ' (path unknown)'}; free space or choose another --out / --cache-dir"
    if exc.errno == errno.EROFS:
        return f"read-only file system:{where}; choose a writable --out / --cache-dir"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; choose a folder you can write (--out / --cache-dir)"
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}:{where}" if where else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    from . import interrupt

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_of(argv))
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return EXIT_ERROR
    debug = bool(getattr(ns, "debug", False)) or os.environ.get("AUDITOR_DEBUG", "") not in ("", "0")
    with interrupt.handlers():
        try:
            return ns.func(ns)
        except AuditorError as exc:
            if debug:
                traceback.print_exc()
            _err(str(exc))
            return exc.exit_code
        except interrupt.Terminated:
            _err("terminated by SIGTERM; partial files were removed (--out holds one whole run, as before or "
                 "new), and completed activation chunks stay in the cache for the next run")
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            _err("interrupted; completed activation chunks are kept in the cache and reused on the next run")
            return EXIT_INTERRUPTED
        except OSError as exc:
            if debug:
                traceback.print_exc()
            _err(os_error_line(exc))
            return EXIT_ERROR
        except Exception as exc:  # a bug: one line, never exit 1 (that means "flagged")
            if debug:
                traceback.print_exc()
            where = _origin(exc)
            _err(f"unexpected {type(exc).__name__}: {_one_line(exc)}{where} — this is a bug in auditor or an "
                 "input it does not recognise; rerun with --debug for the traceback and report it")
            return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + (" …" if len(text) > 300 else "") if text else "(no message)"


def _origin(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    last = tb[-1]
    return f" (at {os.path.basename(last.filename)}:{last.lineno})"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
