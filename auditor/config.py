"""The audit configuration: one frozen, validated object.

A YAML file and command-line flags describe the same fields (flags use dashes,
YAML uses underscores; flags win). Validation is pydantic's, with its messages
rewritten into one line that names the key, the value received and what is
expected. Unknown keys are rejected with the key named and the closest match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, did_you_mean


def default_cache_dir() -> Path:
    """The user's cache folder (XDG), never inside an output folder."""
    base = os.environ.get("AUDITOR_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "auditor"


class SynthSection(BaseModel):
    """``synth:`` — synthesise artifact copies of the probe images before the audit (see auditor.synth)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifacts: tuple[str, ...] = Field(..., min_length=1, description="generators to apply, e.g. watermark,text")
    fraction: float | dict[str, float] = Field(0.5, description="fraction of the clean images that get a copy "
                                               "carrying each artifact (or per artifact: {watermark: 0.5})")
    seed: int = Field(0, description="seed: the same seed gives byte-identical images")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-artifact generator "
                                              "parameters, e.g. {watermark: {opacity: 0.5}}")
    plugins: tuple[str, ...] = Field((), description="modules or .py files that register more generators")

    @field_validator("artifacts", "plugins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, dict) else [value]
        for v in values:
            if not 0.0 < v <= 1.0:
                raise ValueError(f"fractions must be in (0, 1], got {v}")
        return value


class DoraSection(BaseModel):
    """``dora:`` — DORA outlier analysis from synthetic images (see auditor.dora, docs/dora.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="run DORA (the section being present turns it on)")
    size: int | None = Field(None, ge=8, description="s-AMS side in pixels (default: the model's crop size, "
                             "else the probe images' size, else 224)")
    steps: int = Field(90, ge=1, description="Adam steps per s-AMS")
    lr: float = Field(0.05, gt=0.0, description="Adam learning rate")
    signals: int = Field(3, ge=1, description="s-AMS per neuron (different random starts)")
    batch_size: int = Field(64, ge=1, description="images per optimisation batch (many neurons per batch)")
    seed: int = Field(0, description="seed: the same seed gives the same s-AMS")
    distance: Literal["pairwise", "layerwise"] = Field("pairwise", description="EA distance form: the paper's "
                                                       "pairwise form or the reference package's layer-wise form")
    outliers: Literal["lof", "iforest", "knn"] = Field("lof", description="outlier scores on the EA distances")
    neighbors: int | None = Field(None, ge=1, description="neighbours for lof/knn (default min(20, (K-1)//2))")
    contamination: float | None = Field(None, gt=0.0, le=0.5, description="share of neurons called outliers "
                                        "(default: the method's own threshold)")


def _dora_value(value: Any) -> Any:
    """``--dora`` on the command line: on/off, or YAML (``{steps: 60, signals: 2}``)."""
    if isinstance(value, bool):
        return {} if value else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("on", "true", "yes", "1", ""):
            return {}
        if word in ("off", "false", "no", "0", "none"):
            return None
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"expected on, off or a YAML mapping such as {{steps: 60}}, got {value!r}") from None
        return parsed if parsed is not None else {}
    return value

class SignoffSection(BaseModel):
    """``signoff:`` — who prepared and reviewed the audit and what was decided (printed on page 1).

    Any field left out stays a blank line to fill in on the printed report.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prepared_by: str | None = Field(None, description="who ran the audit")
    reviewed_by: str | None = Field(None, description="who reviewed it")
    decision: str | None = Field(None, description="the decision taken, e.g. 'release blocked until retrained'")
    date: str | None = Field(None, description="date of the decision (free text, e.g. 2026-12-02)")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # --signoff "prepared_by=A. Lee; reviewed_by=B. Chen" on the command line
        if isinstance(value, str):
            out: dict[str, str] = {}
            for part in value.split(";"):
                if not part.strip():
                    continue
                key, sep, val = part.partition("=")
                if not sep:
                    raise ValueError(f"expected key=value pairs separated by ';', got {part.strip()!r}")
                out[key.strip()] = val.strip()
            return out
        return value

    @field_validator("date", mode="before")
    @classmethod
    def _date_text(cls, value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value  # YAML reads 2026-12-02 as a date


def _synth_value(value: Any) -> Any:
    """``--synth`` on the command line: YAML (``{artifacts: [watermark], fraction: 0.3}``) or a list of names."""
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        value = parsed
        if isinstance(value, str):
            return {"artifacts": value}
    if isinstance(value, (list, tuple)):
        return {"artifacts": tuple(value)}
    return value


class AuditConfig(BaseModel):
    """Everything that defines an audit. Field docs become the CLI help."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # -- model -------------------------------------------------------------
    model: str | None = Field(None, description="torchvision architecture name (resnet18), "
                              "package.module:callable, path/to/file.py:callable, or a TorchScript file")
    weights: str | None = Field(None, description="state_dict or checkpoint file (loaded with weights_only=True)")
    layer: str | None = Field(None, description="dotted module name to audit, e.g. layer4 or layer4.1.conv2 "
                              "(see `auditor layers MODEL`); several, comma-separated, share one pass")

    # -- preprocessing -----------------------------------------------------
    resize: int | None = Field(None, ge=1, description="resize the shorter image side to this many pixels")
    crop: int | None = Field(None, ge=1, description="center-crop to this size")
    mean: tuple[float, float, float] | None = Field(None, description="per-channel normalisation mean, e.g. 0.485,0.456,0.406")
    std: tuple[float, float, float] | None = Field(None, description="per-channel normalisation std, e.g. 0.229,0.224,0.225")
    normalize: bool = Field(True, description="normalise with mean/std (--no-normalize: feed plain [0, 1] RGB)")

    # -- probe data --------------------------------------------------------
    images: str | None = Field(None, description="folder holding the probe images")
    labels: str | None = Field(None, description="concept labels: CSV or Parquet (wide: path then one 0/1 column "
                               "per concept; long: path,concept), COCO instances JSON or .npz; leave out for "
                               "class folders (images/<class>/...)")
    labels_format: Literal["auto", "wide", "long", "folders", "coco", "npz"] = Field(
        "auto", description="format of --labels (auto: from the suffix and the header)")
    hierarchy: str | None = Field(None, description="concept hierarchy (JSON or CSV, parent → children, e.g. "
                                  "WordNet ids with names): every ancestor of a concept becomes a concept")
    synth: SynthSection | None = Field(None, description="synthesise artifact copies of the probe images first, "
                                       "e.g. {artifacts: [watermark], fraction: 0.5, seed: 0}")
    artifacts: tuple[str, ...] = Field((), description="artifact concept names, comma-separated (e.g. watermark,text)")
    on_bad_image: Literal["error", "skip"] = Field("error", description="what to do with unreadable images")

    # -- collection ---------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to run the model")
    reduction: Literal["mean", "max", "cls"] = Field("mean", description="per-neuron reduction: mean or max over "
                                                     "space (B, C, H, W) or tokens (B, T, D); cls = token 0")
    token_layout: Literal["auto", "batch_first", "sequence_first"] = Field(
        "auto", description="where a (3-D) token layer's output holds the batch: (B, T, D) batch_first, "
                            "(T, B, D) sequence_first, or auto (measured once per layer by a calibration pass)")
    precision: Literal["float32", "tf32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="forward-pass precision on CUDA (autocast); reduced precision can change "
                               "findings (see docs/activations.md), auto = float32")
    channels_last: bool = Field(False, description="run the model in channels-last memory format")
    compile: bool = Field(False, description="torch.compile the model before collecting")
    pin_memory: bool = Field(True, description="pinned host memory for CUDA transfers")
    prefetch_factor: int = Field(2, ge=1, description="batches each DataLoader worker prepares ahead")
    decode: Literal["pil", "device"] = Field("pil", description="decode JPEGs with PIL in workers, or on the "
                                                                 "GPU (device)")
    fingerprint: Literal["stat", "content"] = Field("stat", description="image fingerprint for the cache: "
                                                    "paths, sizes and mtimes (stat) or file contents")
    chunk_size: int = Field(2048, ge=1, description="images per cache chunk (the unit of resume)")
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cache_dir: str | None = Field(None, description="activation cache folder (default: the user's cache folder)")
    no_cache: bool = Field(False, description="do not read or write the activation cache")

    # -- INVERT search -------------------------------------------------------
    length: int = Field(3, ge=1, le=10, description="maximum formula length")
    beam: int = Field(5, ge=1, le=1000, description="beam size")
    min_fraction: float = Field(0.01, ge=0.0, le=1.0, description="smallest admissible support fraction "
                                "(formulas covering fewer images fit a handful of images by chance; "
                                "INVERT's own default is 0)")
    max_fraction: float = Field(0.5, ge=0.0, le=1.0, description="largest admissible support fraction")
    limit_search: int | None = Field(None, ge=1, description="expansion pool size (default: all atoms)")
    heldout: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of images held out to score "
                                  "the found formulas without search bias (e.g. 0.5)")
    seed: int = Field(0, description="seed for the held-out split and the bootstrap")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for AUROC confidence intervals (0 = off)")

    # -- flagging --------------------------------------------------------------
    flag_max_p: float = Field(0.01, gt=0.0, le=1.0, description="largest Benjamini-Hochberg adjusted p-value "
                              "(over every test of the audit) of a flagged (neuron, artifact) pair (alpha)")
    flag_min_effect: float = Field(0.1, ge=0.0, le=0.5, description="smallest |stratified artifact AUROC - 0.5| "
                                   "that flags a neuron whose best formula names the artifact or a container")
    flag_strong_effect: float = Field(0.25, ge=0.0, le=0.5, description="|stratified artifact AUROC - 0.5| that "
                                      "flags a neuron whatever its formulas say")
    flag_min_artifact_rows: int = Field(10, ge=1, description="fewest artifact rows the tested region must hold")
    flag_strata: int = Field(3, ge=0, le=10, description="concepts most associated with the artifact that "
                             "stratify every test (and its calibration)")
    calibration_runs: int = Field(20, ge=0, le=1000, description="reruns of the whole decision with the artifact "
                                  "labels permuted (flags chance alone raises; 0 = off)")
    fail_on_flag: bool = Field(True, description="exit with code 1 when neurons are flagged")
    fail_on_inconclusive: bool = Field(False, description="exit with code 1 when an artifact test is inconclusive "
                                       "(no stratum where the artifact varies)")

    # -- DORA ---------------------------------------------------------------------
    dora: DoraSection | None = Field(None, description="DORA outlier neurons from synthetic images (off by default): "
                                     "on, or YAML such as {steps: 90, signals: 3, distance: pairwise}")

    # -- impact on the model's outputs -------------------------------------------------
    impact: bool = Field(True, description="measure what each artifact with a generator does to the model's "
                         "outputs: paste it on clean probe images, compare predictions (flip rate), an occlusion "
                         "control, and the ablation of flagged neurons (--no-impact: skip)")
    impact_count: int = Field(500, ge=1, description="clean probe images the artifacts are pasted on (at most all "
                              "images that carry no artifact concept); `auditor synth --count` gives the same")
    impact_seed: int | None = Field(None, description="seed of the pasted artifacts (default: synth.seed, else seed)")
    impact_params: dict[str, dict[str, Any]] | None = Field(None, description="generator parameters per artifact, "
                                                            "e.g. {watermark: {logo: mark.png, opacity: [0.3, 0.6]}} "
                                                            "(default: synth.params)")
    output: Literal["auto", "classes", "embedding"] = Field(
        "auto", description="what the model returns: class scores (flip rate, class flows) or an embedding "
                            "(cosine distance per head); auto: class scores when the output is one (N, C) tensor")
    class_names: str | None = Field(None, description="text file with one class name per line (or a JSON list), "
                                    "in output order (default: torchvision weights metadata, else indices)")
    ablation: Literal["mean", "zero"] = Field("mean", description="how flagged neurons are ablated: replaced by "
                                              "their mean over the clean test images, or by zero")
    ablation_draws: int = Field(10, ge=1, description="random ablations of as many unflagged neurons, to compare")
    fail_on_impact: float | None = Field(None, ge=0.0, le=1.0, description="exit with code 1 when an artifact "
                                         "flips more than this fraction of predictions (e.g. 0.05)")
    save_pairs: str | None = Field(None, description="folder to write the clean/pasted image pairs into "
                                   "(the `auditor synth` layout)")

    # -- output ------------------------------------------------------------------
    out: str = Field("audit-report", description="output folder")
    top_k: int = Field(9, ge=0, le=64, description="top-activating images kept per neuron")
    title: str | None = Field(None, description="report title")
    signoff: SignoffSection | None = Field(None, description="sign-off block on page 1: prepared_by, reviewed_by, "
                                           "decision, date (YAML mapping, or 'key=value; key=value')")
    formats: tuple[Literal["html", "pdf", "json", "csv", "junit"], ...] = Field(
        ("html", "pdf", "json", "csv", "junit"), description="outputs to write")

    @field_validator("artifacts", "formats", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @model_validator(mode="before")
    @classmethod
    def _synth_defaults(cls, values: Any) -> Any:
        # The synthesised artifacts are the audited ones unless `artifacts` says otherwise.
        if isinstance(values, dict) and values.get("synth") is not None:
            values = dict(values)
            values["synth"] = _synth_value(values["synth"])
            syn = values["synth"]
            arts = syn.get("artifacts") if isinstance(syn, dict) else getattr(syn, "artifacts", None)
            if not values.get("artifacts") and arts:
                values["artifacts"] = arts
        return values

    @field_validator("dora", mode="before")
    @classmethod
    def _dora(cls, value: Any) -> Any:
        value = _dora_value(value)
        if isinstance(value, dict) and value.get("enabled") is False:
            return None
        return value

    @field_validator("impact_params", mode="before")
    @classmethod
    def _impact_params(cls, value: Any) -> Any:
        if isinstance(value, str):  # --impact-params on the command line: YAML
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"expected a YAML mapping like {{watermark: {{opacity: 0.5}}}}, got {value!r}") \
                    from None
        return value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _split_floats(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [v.strip() for v in value.split(",") if v.strip()]
            try:
                return tuple(float(p) for p in parts)
            except ValueError:
                raise ValueError(f"expected three comma-separated numbers, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> AuditConfig:
        if self.flag_min_effect > self.flag_strong_effect:
            raise ValueError(f"flag_min_effect ({self.flag_min_effect}) must not exceed flag_strong_effect "
                             f"({self.flag_strong_effect})")
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"min_fraction ({self.min_fraction}) must not exceed max_fraction ({self.max_fraction})")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if len(set(self.artifacts)) != len(self.artifacts):
            raise ValueError(f"artifacts lists a concept twice: {list(self.artifacts)}")
        return self

    # -- derived -----------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return [part.strip() for part in (self.layer or "").split(",") if part.strip()]

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def plain(self) -> dict[str, Any]:
        """JSON-able dict of every field (recorded in results.json)."""
        return self.model_dump(mode="json")


FIELDS = AuditConfig.model_fields


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
        if err["type"] == "extra_forbidden" and len(err["loc"]) > 1 and err["loc"][0] in ("synth", "signoff", "dora"):
            key, section = str(err["loc"][-1]), str(err["loc"][0])
            known = {"synth": SynthSection, "signoff": SignoffSection, "dora": DoraSection}[section].model_fields
            parts.append(f"unknown key '{section}.{key}' in {source}{did_you_mean(key, known)}")
            continue
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][0])
            hint = did_you_mean(key, FIELDS) or " (see `auditor run --help` for the valid keys)"
            parts.append(f"unknown config key {key!r} in {source}{hint}")
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        if loc == "config":
            parts.append(f"{source}: {msg}")
        else:
            parts.append(f"invalid {loc!r} in {source}: {msg}{shown}")
    return "; ".join(parts)


def _replaced(key: str, source: str) -> ConfigError:
    from .flags import REPLACED_KEYS

    return ConfigError(f"config key {key!r} in {source} belongs to the old flag rule and was replaced: use "
                       f"{REPLACED_KEYS[key]} (see README 'How flags work')")


def make_config(values: dict[str, Any], source: str = "the configuration") -> AuditConfig:
    from .flags import REPLACED_KEYS

    for key in values:
        if key in REPLACED_KEYS:
            raise _replaced(key, source)
    try:
        return AuditConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (keys validated later)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    # Relative paths in a config file are relative to the file, not the working dir.
    synth = data.get("synth")
    if isinstance(synth, dict) and isinstance(synth.get("plugins"), list):
        synth["plugins"] = [str(path.parent / p) if isinstance(p, str) and p.endswith(".py")
                            and not Path(p).is_absolute() else p for p in synth["plugins"]]
    impact_params = data.get("impact_params")
    if isinstance(impact_params, dict):  # a logo or font file named in the config: relative to the file
        for params in impact_params.values():
            if isinstance(params, dict):
                for k in ("logo", "font"):
                    v = params.get(k)
                    if isinstance(v, str) and not Path(v).is_absolute():
                        params[k] = str(path.parent / v)
    for key in ("model", "weights", "images", "labels", "hierarchy", "cache_dir", "out", "class_names",
                "save_pairs"):
        value = data.get(key)
        if isinstance(value, str) and key != "model" and not Path(value).is_absolute():
            data[key] = str((path.parent / value))
        elif key == "model" and isinstance(value, str):
            file_part = value.split(":", 1)[0]
            if (file_part.endswith(".py") or file_part.endswith((".pt", ".pth", ".ts", ".jit"))) \
                    and not Path(file_part).is_absolute() and (path.parent / file_part).exists():
                data[key] = str(path.parent / value)
    return data


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> AuditConfig:
    """YAML file (optional) plus overrides (flags win)."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    source = str(path) if path else "the command line"
    from .flags import REPLACED_KEYS

    for key in values:
        if key in REPLACED_KEYS:
            raise _replaced(key, source)
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r} in {source}"
                              + (did_you_mean(key, FIELDS) or " (see `auditor run --help` for the valid keys)"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_config(values, source if not overrides else f"{source} and flags" if path else source)
