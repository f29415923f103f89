"""The experiment config: a TOML file validated on load (pydantic, unknown keys forbidden).

Every error names the offending key and the file, on one line (with the closest valid key or value as a
"did you mean"). The schema is docs/config.md's and the README's example config; keys may grow, never
break. Values a section does not give take the defaults below, which are the embedded default run.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from suite.engine.device_names import check_device_name
from suite.errors import ConfigError
from suite.registry import did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    name: str = "smollm2-135m"  # the embedded default, a hub id, a local directory or a .gguf file
    # Where the clients compute ("auto" = the first GPU if one is visible, else the CPU), where the server's
    # trunk computes (None = the same as ``device``), and the floating-point type of every party's weights.
    device: str = "auto"
    server_device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("device", "server_device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        return value if value is None else check_device_name(value)


class CorpusSection(_Section):
    """Exactly one source: ``generator`` (with size and seed), ``path`` (a local CSV/JSONL/TXT file) or ``hub``."""

    generator: Literal["records"] | None = None
    size: int | None = Field(default=None, ge=1)
    seed: int | None = None
    path: str | None = None
    hub: str | None = None
    split: str | None = None
    text_field: str | None = None
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSection:
        sources = [k for k in ("generator", "path", "hub") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'generator', 'path' or 'hub'")
        if self.generator is not None:
            if self.size is None:
                raise ValueError("a generated corpus needs 'size'")
            if self.path or self.text_field or self.limit or self.split:
                raise ValueError("'text_field', 'limit' and 'split' are for files and hub datasets")
        elif self.size is not None or self.seed is not None:
            raise ValueError("'size' and 'seed' are for generated corpora; use 'limit' for files")
        return self

    def spec(self) -> dict[str, Any]:
        """The spec dict ``suite.experiment.data.load_corpus`` takes."""
        return self.model_dump(exclude_none=True)


class CanarySection(_Section):
    """Secret-format records inserted into the canary victim's training data (``suite.experiment.canaries``):
    ``count`` canaries for each value of ``repeats``, each inserted that many times."""

    count: int = Field(default=20, ge=1, le=10_000)
    repeats: list[int] = [1, 10, 50]
    seed: int = 0  # draws the secrets (fresh per canary, uniform over the stated space)
    # the secret's format, each "#" a decimal digit: the space is 10^(number of #), exposure's cap its log2
    format: str = "####-####-####"

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        digits = value.count("#")
        if not 4 <= digits <= 18 or not value.isprintable() or any(ch.isdigit() for ch in value):
            raise ValueError(f"give a secret format of 4 to 18 '#' (one digit each) and literal separators, e.g. "
                             f"'####-####-####' or '####' (10^4 secrets: exposure capped at 13.3 bits), not {value!r}")
        return value

    @field_validator("repeats")
    @classmethod
    def _repeats(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value) or len(set(value)) != len(value):
            raise ValueError(f"give distinct repeat counts >= 1, e.g. [1, 10, 50], not {value}")
        return value


class DataSection(_Section):
    max_length: int = Field(default=32, ge=4, le=8192)
    private: CorpusSection = CorpusSection(generator="records", size=64, seed=1)
    shadow: CorpusSection = CorpusSection(generator="records", size=512, seed=2)
    held_out: int = Field(default=64, ge=1)  # held-out records of the private kind for utility (not trained on)
    canaries: CanarySection | None = None  # memorisation: secret-format records in the victim's data


class TrainingSection(_Section):
    strategy: Literal["serial", "batch_parallel", "per_client"] = "serial"
    clients: int = Field(default=2, ge=1, le=256)
    steps: int = Field(default=30, ge=0)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    # the rate of a part trained in full (finetune / server_finetune = "full"); None: lr. LoRA takes rates ~10-20x
    # a full fine-tune's, so one lr for both either starves the adapters or wrecks the fully tuned weights
    full_lr: float | None = Field(default=None, gt=0)
    finetune: Literal["lora", "full", "frozen"] = "lora"  # what the clients train
    server_finetune: Literal["lora", "full", "frozen"] = "lora"
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_targets: Literal["attention", "all"] = "attention"  # peft's default (q/v projections) or every linear
    fedavg_every: int = Field(default=0, ge=0)
    seed: int = 0
    head_blocks: int = Field(default=1, ge=0)  # for `splitleak train`; the matrix takes its splits below
    tail_blocks: int = Field(default=1, ge=0)
    stages: int = Field(default=1, ge=1, le=256)  # the server's blocks as S pipeline stage parties (docs/pipeline.md)

    def full_lr_used(self) -> bool:
        """Whether ``full_lr`` trains anything: set, and some part trained in full. Where it does not, it is
        left out of every key and hash, so configs from before it existed keep theirs."""
        return self.full_lr is not None and "full" in (self.finetune, self.server_finetune)


class MatrixSection(_Section):
    splits: list[int] = [0, 1, 2]
    tail_blocks: int = Field(default=1, ge=0)
    # a name, or a stage threat's table with its (swept) index: { name = "curious_stage", stage = [0, 1, 2] }
    threats: list[str | dict[str, Any]] = ["curious_server", "colluding_client", "malicious_server", "eavesdropper",
                                           "peer_client"]
    attacks: list[str | dict[str, Any]] = ["nearest_embedding", "wire_inversion"]
    defenses: list[str | dict[str, Any]] = ["none", "encryption"]
    # Optional axes, each a list overriding [training] per cell (part of the training run and the cell key):
    # training budget, what the clients fine-tune, and repeated training seeds (metrics then pool records x
    # seeds, see docs/config.md "Sweeps, training axes and seeds"). An attack or defense parameter given as a list is a sweep too.
    steps: list[int] | None = None
    finetune: list[Literal["lora", "full", "frozen"]] | None = None
    seeds: list[int] | None = None
    blind: bool = True  # run the blind baseline on every victim set and store each metric's advantage over it
    # Cells to leave out of the product, e.g. { attack = "fsha", defense = "dxp" }: a cell matching every key
    # given (threat, attack, defense names and split, each a value or a list of values; attack_params /
    # defense_params: a subset of its parameters) is left out and listed with the reason.
    skip: list[dict[str, Any]] = []
    # What the cells observe (docs/inference.md): the traffic of training, or of the trained split serving its
    # victims' prompts ([inference]); inference cells reuse the training run of their split.
    mode: list[Literal["training", "inference"]] = ["training"]

    @model_validator(mode="after")
    def _check(self) -> MatrixSection:
        if any(k < 0 for k in self.splits):
            raise ValueError("splits are client head block counts and must be >= 0")
        for axis in ("steps", "finetune", "seeds"):
            values = getattr(self, axis)
            if values is not None and not values:
                raise ValueError(f"{axis}: an empty list sweeps nothing; leave it out to use [training]'s value")
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"{axis}: {values} repeats a value")
        if not self.mode or len(set(self.mode)) != len(self.mode):
            raise ValueError(f"mode: give 'training' and/or 'inference' once each, not {self.mode}")
        if self.steps is not None and any(s < 0 for s in self.steps):
            raise ValueError("steps: training steps must be >= 0")
        allowed = {"threat", "attack", "defense", "split", "attack_params", "defense_params"}
        for i, rule in enumerate(self.skip):
            if not rule or set(rule) - allowed:
                raise ValueError(f"skip[{i}]: give some of {sorted(allowed)}, not {sorted(set(rule) - allowed)}")
            splits = rule.get("split", 0)
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in
                       (splits if isinstance(splits, list) else [splits])):
                raise ValueError(f"skip[{i}].split: give a head block count or a list of them, e.g. split = [0, 2]")
        for d in [*self.attacks, *self.defenses]:
            if isinstance(d, dict) and not isinstance(d.get("name"), str):
                raise ValueError("an attack or defense given as a table needs a 'name'")
        return self


class InferenceSection(_Section):
    """Inference cells (``[matrix] mode = ["inference"]``): each victim's records are prompts (its first
    ``prompts``, all when None), each answered with ``new_tokens`` generated tokens (greedy at ``temperature =
    0``, else sampled from the ``top_k`` most likely, 0 = all)."""

    new_tokens: int = Field(default=32, ge=2, le=4096)
    prompts: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_k: int = Field(default=0, ge=0)


class ExecutorSection(_Section):
    """How the matrix runs. ``workers``: local worker processes, one training group each (``--workers``
    overrides it). ``cpus_per_task``/``gpus_per_task``: what each Ray task (one training group) asks the
    cluster for. The engine computes on ``[model] device``: with ``device = "auto"`` a Ray task given
    ``gpus_per_task`` computes on its GPU (Ray sets CUDA_VISIBLE_DEVICES), and on the CPU without one."""

    workers: int = Field(default=1, ge=1, le=256)
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float = Field(default=0.0, ge=0)


class ExperimentConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    matrix: MatrixSection = MatrixSection()
    inference: InferenceSection = InferenceSection()
    executor: ExecutorSection = ExecutorSection()


def _section_keys(path: tuple) -> list[str]:
    """The keys valid where ``path`` (a validation error's location, last part the bad key) points."""
    cls: Any = ExperimentConfig
    for part in path[:-1]:
        field = cls.model_fields.get(str(part)) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        options = [field.annotation, *getattr(field.annotation, "__args__", ())]
        cls = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = tuple(p for p in first["loc"] if not str(p).startswith("function-after"))
    loc = ".".join(str(p) for p in path)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(str(path[-1]), _section_keys(path))
        msg = f"unknown key{hint or ' (check the spelling against the README example config)'}"
    elif first["type"] == "literal_error" and isinstance(first.get("input"), str):
        msg += did_you_mean(first["input"], re.findall(r"'([^']*)'", first.get("ctx", {}).get("expected", "")))
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc or 'config'}: {msg}{more}"


def parse_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


DEFAULT_MATRIX = Path(__file__).with_name("default_matrix.toml")


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Read and validate a TOML config; ``None`` gives the embedded default."""
    if path is None:
        return ExperimentConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {p}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None
    return parse_config(data, str(p))
