"""Train DemoNet with a planted watermark shortcut and save its weights.

    python -m auditor.demo.train [--out auditor/demo/demo_model.pt] [--seed 0]

The training images come fresh from :func:`auditor.demo.data.generate` (seeds
that the probe set does not use). ``DEMO_SHORTCUT_CLASS`` images carry a
stock-photo watermark 95% of the time, the other classes 3% of the time; the
other artifacts (text, border, timestamp) appear on every class alike, so the
model has no reason to treat them as evidence. The script prints the train and
validation accuracy and the shortcut's effect: how often clean images of the
other classes are called ``DEMO_SHORTCUT_CLASS``, and how often they are once a
watermark is pasted on them.

Training is deterministic for a given seed, torch build and thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from auditor.artifacts import get_artifact
from auditor.errors import AuditorError
from auditor.demo.data import ARTIFACT_CONCEPTS, Shortcut, generate
from auditor.demo.model import (
    DEMO_CLASSES,
    DEMO_IMAGE_SIZE,
    DEMO_SHORTCUT_ARTIFACT,
    DEMO_SHORTCUT_CLASS,
    DEMO_WEIGHTS,
    DemoNet,
    images_to_tensor,
)

__all__ = ["ShortcutReport", "TrainConfig", "evaluate_shortcut", "main", "train"]

# Rates of the non-shortcut artifacts in the training data, independent of class.
TRAIN_ARTIFACT_RATES = {"text": 0.2, "border": 0.15, "timestamp": 0.15}
# Seed offsets keep training, validation and evaluation images apart from each
# other and from the probe set (which uses small seeds, 0 by default).
_TRAIN_SEED, _VAL_SEED, _EVAL_SEED = 100_000, 200_000, 300_000


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_train: int = 4000
    n_val: int = 800
    n_eval: int = 800
    epochs: int = 4
    batch_size: int = 64
    lr: float = 5e-3
    threads: int = 1  # torch threads while training; 1 makes runs repeatable across machines
    p_class: float = 0.95
    p_other: float = 0.03


@dataclass(frozen=True)
class ShortcutReport:
    """How the watermark moves predictions on paired clean/watermarked images."""

    clean_accuracy: float  # all classes, no artifacts
    shortcut_class_clean_accuracy: float  # clean images of the shortcut class
    others_clean_accuracy: float  # clean images of the other classes
    others_watermarked_accuracy: float  # the same images with a watermark pasted on
    others_clean_to_shortcut: float  # fraction of clean others predicted as the shortcut class
    others_watermarked_to_shortcut: float  # ... once watermarked
    n: int


def _log(msg: str) -> None:
    print(msg, flush=True)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def evaluate_shortcut(model: nn.Module, seed: int = 0, n: int = 800) -> ShortcutReport:
    """Paste watermarks on clean held-out images and measure the shift towards the shortcut class."""
    clean = generate(n, seed=_EVAL_SEED + seed, image_size=DEMO_IMAGE_SIZE,
                     artifact_rates={name: 0.0 for name in ARTIFACT_CONCEPTS})
    wm = get_artifact(DEMO_SHORTCUT_ARTIFACT)
    marked = [wm(im, np.random.default_rng([_EVAL_SEED + seed, i])) for i, im in enumerate(clean.images)]
    y = torch.from_numpy(clean.targets)
    p_clean = _predict(model, images_to_tensor(clean.images))
    p_marked = _predict(model, images_to_tensor(marked))
    k = DEMO_CLASSES.index(DEMO_SHORTCUT_CLASS)
    own, others = y == k, y != k
    return ShortcutReport(
        clean_accuracy=float((p_clean == y).float().mean()),
        shortcut_class_clean_accuracy=float((p_clean[own] == y[own]).float().mean()),
        others_clean_accuracy=float((p_clean[others] == y[others]).float().mean()),
        others_watermarked_accuracy=float((p_marked[others] == y[others]).float().mean()),
        others_clean_to_shortcut=float((p_clean[others] == k).float().mean()),
        others_watermarked_to_shortcut=float((p_marked[others] == k).float().mean()),
        n=n,
    )


def train(config: TrainConfig = TrainConfig(), log=_log) -> tuple[DemoNet, dict]:
    """Train a DemoNet with the planted shortcut; returns the model (eval mode) and metrics."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, log)
    finally:
        torch.set_num_threads(old_threads)


def _train(config: TrainConfig, log) -> tuple[DemoNet, dict]:
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    shortcut = Shortcut(DEMO_SHORTCUT_CLASS, DEMO_SHORTCUT_ARTIFACT, config.p_class, config.p_other)
    tr = generate(config.n_train, seed=_TRAIN_SEED + config.seed, image_size=DEMO_IMAGE_SIZE,
                  artifact_rates=TRAIN_ARTIFACT_RATES, shortcut=shortcut)
    va = generate(config.n_val, seed=_VAL_SEED + config.seed, image_size=DEMO_IMAGE_SIZE,
                  artifact_rates=TRAIN_ARTIFACT_RATES, shortcut=shortcut)
    x_tr, y_tr = images_to_tensor(tr.images), torch.from_numpy(tr.targets)
    x_va, y_va = images_to_tensor(va.images), torch.from_numpy(va.targets)
    t_data = time.perf_counter() - t0
    log(f"data: {len(x_tr)} train / {len(x_va)} val images in {t_data:.1f}s "
        f"(watermark on {tr.labels['watermark'].mean():.0%} of train images)")

    model = DemoNet()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * ((len(x_tr) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        val_acc = float((_predict(model, x_va) == y_va).float().mean())
        log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / total:.3f}  "
            f"train acc {correct / total:.3f}  val acc {val_acc:.3f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    train_acc = float((_predict(model, x_tr) == y_tr).float().mean())
    val_acc = float((_predict(model, x_va) == y_va).float().mean())
    report = evaluate_shortcut(model, seed=config.seed, n=config.n_eval)
    metrics = {
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        **asdict(report),
        "seconds": time.perf_counter() - t0,
        "config": asdict(config),
    }
    return model, metrics


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auditor.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_WEIGHTS, help="where to write the state dict (default: %(default)s)")
    parser.add_argument("--seed", type=_non_negative, default=0)
    parser.add_argument("--epochs", type=_positive, default=TrainConfig.epochs)
    parser.add_argument("--n-train", type=_positive, default=TrainConfig.n_train)
    parser.add_argument("--n-val", type=_positive, default=TrainConfig.n_val)
    parser.add_argument("--n-eval", type=_positive, default=TrainConfig.n_eval)
    parser.add_argument("--threads", type=_positive, default=TrainConfig.threads)
    parser.add_argument("--p-class", type=float, default=TrainConfig.p_class,
                        help="share of shortcut-class images that carry the watermark (default: %(default)s)")
    parser.add_argument("--p-other", type=float, default=TrainConfig.p_other,
                        help="share of the other classes' images that carry it (default: %(default)s); "
                             "--p-class 0.2 --p-other 0.2 trains the control model without the shortcut")
    args = parser.parse_args(argv)
    for name in ("p_class", "p_other"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')}: expected a share in [0, 1], got {getattr(args, name)}")
    config = TrainConfig(seed=args.seed, epochs=args.epochs, n_train=args.n_train, n_val=args.n_val,
                         n_eval=args.n_eval, threads=args.threads, p_class=args.p_class, p_other=args.p_other)
    try:
        model, m = train(config)
    except AuditorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    _log(f"train accuracy {m['train_accuracy']:.3f}, val accuracy {m['val_accuracy']:.3f}")
    _log(f"clean held-out accuracy {m['clean_accuracy']:.3f} (n={m['n']}); "
         f"clean {DEMO_SHORTCUT_CLASS!r} images: {m['shortcut_class_clean_accuracy']:.3f}")
    _log(f"other classes: accuracy clean {m['others_clean_accuracy']:.3f} -> watermarked "
         f"{m['others_watermarked_accuracy']:.3f}; predicted {DEMO_SHORTCUT_CLASS!r} "
         f"clean {m['others_clean_to_shortcut']:.3f} -> watermarked {m['others_watermarked_to_shortcut']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    _log(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) after {m['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
