"""Parameters and results of the INVERT engine (plain frozen dataclasses)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConfigError

MODES = ("positive", "negative")
ALTERNATIVES = ("two-sided", "greater", "less")
BACKENDS = ("auto", "scipy", "torch")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _int(name: str, value, lo: int, hi: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"invert.{name} must be an integer >= {lo}{hi}, got {value!r}")


def _frac(name: str, value, closed_low: bool = True, closed_high: bool = True) -> None:
    lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v >= 0 if closed_low else v > 0) and (v <= 1 if closed_high else v < 1)
    if not ok:
        raise ConfigError(f"invert.{name} must be a number in {lo}0, 1{hi}, got {value!r}")


@dataclass(frozen=True)
class InvertParams:
    """Search parameters (see docs/invert.md).

    length: maximum formula length L (atoms per formula), >= 1.
    beam: beam size B, >= 1.
    min_fraction, max_fraction: admissible fraction of images where a formula holds
        (also always 0 < fraction < 1).
    limit_search: size of the expansion pool (atoms with largest |AUROC - 0.5|);
        None = all 2C atoms.
    mode: "positive" (highest AUROC) or "negative" (lowest AUROC).
    alternative: Mann-Whitney alternative: "two-sided", "greater" (activation inside
        the formula's support is higher) or "less" (inside is lower; the natural
        one-sided test for mode="negative").
    heldout: fraction of images held out for scoring (0 < heldout < 1); None = off.
    seed: seed of the held-out split.
    all_lengths: also return the beam after every length 1..L.
    device: "cpu", "cuda" or "cuda:N".
    memory_mb: working-memory budget of the engine, which sets how many neurons are
        searched at once; None = 1024 on the CPU, 8192 on CUDA.
    chunk_neurons: neurons per chunk (overrides memory_mb).
    backend: "auto" (scipy sparse products on CPU, torch on CUDA), "scipy" or "torch".
    """

    length: int = 3
    beam: int = 5
    min_fraction: float = 0.0
    max_fraction: float = 0.5
    limit_search: int | None = None
    mode: str = "positive"
    alternative: str = "two-sided"
    heldout: float | None = None
    seed: int = 0
    all_lengths: bool = False
    device: str = "cpu"
    memory_mb: int | None = None
    chunk_neurons: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        _int("length", self.length, 1)
        _int("beam", self.beam, 1)
        _frac("min_fraction", self.min_fraction)
        _frac("max_fraction", self.max_fraction)
        if self.min_fraction > self.max_fraction:
            raise ConfigError(
                f"invert.min_fraction ({self.min_fraction!r}) must be <= invert.max_fraction "
                f"({self.max_fraction!r})"
            )
        if self.limit_search is not None:
            _int("limit_search", self.limit_search, 1, " or None (all atoms)")
        if self.mode not in MODES:
            raise ConfigError(f"invert.mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        if self.alternative not in ALTERNATIVES:
            raise ConfigError(
                f"invert.alternative must be one of {', '.join(map(repr, ALTERNATIVES))}, got {self.alternative!r}"
            )
        if self.heldout is not None:
            _frac("heldout", self.heldout, closed_low=False, closed_high=False)
        _int("seed", self.seed, 0)
        if not isinstance(self.all_lengths, bool):
            raise ConfigError(f"invert.all_lengths must be true or false, got {self.all_lengths!r}")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ConfigError(f"invert.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.memory_mb is not None:
            _int("memory_mb", self.memory_mb, 16, " or None (automatic)")
        if self.chunk_neurons is not None:
            _int("chunk_neurons", self.chunk_neurons, 1, " or None (from memory_mb)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"invert.backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        if self.backend == "scipy" and self.device != "cpu":
            raise ConfigError(f"invert.backend 'scipy' runs on the CPU only, but device is {self.device!r}")


@dataclass(frozen=True)
class Formula:
    """One scored formula.

    ast: tree of concept names ("name" | ["not", x] | ["and", x, y] | ["or", x, y]).
    text: e.g. "(watermark AND NOT star) OR text".
    auroc / fraction / support / p_value / log10_p: on the search split.
    p_adjusted: Benjamini-Hochberg across neurons (set on each neuron's best formula).
    heldout_*: the same formula scored on the held-out split (when enabled).
    ast_columns: the same tree with concept column indices (exact when names repeat).
    """

    ast: object
    text: str
    length: int
    auroc: float
    fraction: float
    support: int
    p_value: float
    log10_p: float
    p_adjusted: float | None = None
    heldout_auroc: float | None = None
    heldout_p_value: float | None = None
    heldout_log10_p: float | None = None
    ast_columns: object = field(default=None, compare=False)


@dataclass(frozen=True)
class NeuronExplanation:
    """The search result of one neuron."""

    index: int
    status: str  # "ok" | "dead"
    formulas: list[Formula]
    beams: list[list[Formula]] | None = None

    @property
    def best(self) -> Formula | None:
        return self.formulas[0] if self.formulas else None
