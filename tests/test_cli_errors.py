"""Bad input: exit code 2, one specific line on stderr, nothing written to --out."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auditor.cli import main

from conftest import COLOUR_MODEL


def _run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def _set(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _copy_probe(colour_probe, tmp_path):
    images, labels = colour_probe
    root = tmp_path / "probe"
    shutil.copytree(images.parent, root)
    return root / "images", root / "labels.csv"


def _out_untouched(args):
    out = Path(args[args.index("--out") + 1])
    return not out.exists() and not list(out.parent.glob(".*"))


@pytest.mark.parametrize("flag, value, pattern", [
    ("--images", "/nonexistent/images", "image folder not found: /nonexistent/images"),
    ("--labels", "/nonexistent/labels.csv", "labels file not found: /nonexistent/labels.csv"),
    ("--layer", "actt", r"model has no layer 'actt' \(did you mean 'act'\?\).*auditor layers"),
    ("--artifacts", "stmp", r"artifact 'stmp' is not a concept.*did you mean 'stamp'"),
    ("--model", "resnet81", r"unknown model 'resnet81'"),
    ("--weights", "/nonexistent/w.pt", "weights file not found"),
])
def test_bad_flags(colour_args, capsys, flag, value, pattern):
    import re
    args = _set(colour_args, flag, value) if flag in colour_args else colour_args + [flag, value]
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("auditor: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    assert _out_untouched(args)


def test_checkpoint_for_another_architecture(colour_args, capsys, tmp_path):
    ck = tmp_path / "resnet.pt"
    torch.save({"state_dict": torch.nn.Conv2d(3, 2, 3).state_dict()}, ck)
    rc, err = _run(["run"] + colour_args + ["--weights", str(ck)], capsys)
    assert rc == 2 and "do not fit model ColourNet" in err and "Is the checkpoint for another architecture" in err
    assert _out_untouched(colour_args)


def test_corrupt_image(colour_args, colour_probe, capsys, tmp_path):
    images, labels = _copy_probe(colour_probe, tmp_path)
    victim = sorted(images.rglob("*.png"))[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = _set(_set(colour_args, "--images", str(images)), "--labels", str(labels))
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2 and "cannot read image" in err and victim.name in err and "on_bad_image" in err
    assert _out_untouched(args)


def test_non_binary_csv_and_escaping_path(colour_args, colour_probe, capsys, tmp_path):
    images, labels = _copy_probe(colour_probe, tmp_path)
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",2"
    labels.write_text("\n".join(lines) + "\n")
    args = _set(_set(colour_args, "--images", str(images)), "--labels", str(labels))
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2 and "line 4, column 'noisy': value '2' is not 0 or 1" in err
    lines[3] = "../escape.png" + lines[3][lines[3].index(","):-2] + ",1"
    labels.write_text("\n".join(lines) + "\n")
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2 and "escapes the image folder" in err
    assert _out_untouched(args)


def test_artifact_without_positive(colour_args, colour_probe, capsys, tmp_path):
    images, labels = _copy_probe(colour_probe, tmp_path)
    lines = labels.read_text().splitlines()
    header = lines[0].split(",")
    j = header.index("stamp")
    fixed = [lines[0]] + [",".join(v if k != j else "0" for k, v in enumerate(ln.split(","))) for ln in lines[1:]]
    labels.write_text("\n".join(fixed) + "\n")
    args = _set(_set(colour_args, "--images", str(images)), "--labels", str(labels))
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2 and "artifact 'stamp' has no positive image" in err
    assert _out_untouched(args)


def test_unknown_config_key(colour_args, capsys, tmp_path):
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("model: resnet18\nlayre: layer4\n")
    rc, err = _run(["run", str(cfg)] + colour_args, capsys)
    assert rc == 2 and "unknown config key 'layre'" in err and "did you mean 'layer'" in err
    assert _out_untouched(colour_args)


def test_cache_inside_out_is_refused(colour_args, capsys, tmp_path):
    args = _set(colour_args, "--cache-dir", str(Path(colour_args[colour_args.index("--out") + 1]) / "cache"))
    rc, err = _run(["run"] + args, capsys)
    assert rc == 2 and "lies inside the output folder" in err


def test_existing_out_is_left_as_it_was_on_failure(colour_args, capsys):
    out = Path(colour_args[colour_args.index("--out") + 1])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _ = _run(["run"] + _set(colour_args, "--layer", "nope"), capsys)
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_exit_code(colour_args):
    exe = Path(sys.executable).parent / "auditor"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "auditor.cli"]
    proc = subprocess.run(cmd + ["run"] + _set(colour_args, "--layer", "nope"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("auditor: error: model has no layer 'nope'")
