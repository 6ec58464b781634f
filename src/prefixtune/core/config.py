"""Frozen, validated configuration of a prefix, saved as JSON beside its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefixtune.files import dataclass_from_dict

Mode = Literal["prefix", "embedding-only", "infix"]
MODES: tuple[str, ...] = ("prefix", "embedding-only", "infix")


@dataclass(frozen=True)
class PrefixConfig:
    """How a prefix is shaped, parameterized and initialized.

    Attributes:
        prefix_length: P, the number of virtual positions (0 gives the base model back).
        reparam: train P = MLP(P') (Li & Liang) when True; a flat table (P-tuning v2) when False.
        reparam_hidden: h, the MLP's hidden width (the paper uses 512).
        mode: ``"prefix"`` puts K/V at every layer in front of the input; ``"embedding-only"``
            trains P virtual input embeddings only (the model computes their K/V); ``"infix"``
            puts the virtual K/V between the source and the target (``[x; INFIX; y]``).
        encoder_prefix / decoder_prefix / cross_prefix: which attention stacks get a prefix
            (decoder-only models have only the decoder stack; encoders only the encoder stack).
        dropout: dropout on the computed prefix K/V during training.
        init: ``"random"`` or ``"text:<words>"`` (the frozen model's own K/V of those words;
            the prefix length then equals their token count).
        init_std: standard deviation of the random initialization.
    """

    prefix_length: int = 10
    reparam: bool = True
    reparam_hidden: int = 512
    mode: Mode = "prefix"
    encoder_prefix: bool = True
    decoder_prefix: bool = True
    cross_prefix: bool = True
    dropout: float = 0.0
    init: str = "random"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.prefix_length, int) or self.prefix_length < 0:
            raise ValueError(f"prefix_length must be an integer >= 0, got {self.prefix_length!r}")
        if not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 1:
            raise ValueError(f"reparam_hidden must be an integer >= 1, got {self.reparam_hidden!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init != "random" and not self.init.startswith("text:"):
            raise ValueError(f"init must be 'random' or 'text:<words>', got {self.init!r}")
        if self.init.startswith("text:") and not self.init_text.strip():
            raise ValueError("init 'text:' needs words after the colon, e.g. 'text:table-to-text:'")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        if self.mode == "embedding-only" and self.init.startswith("text:"):
            # The words' own embeddings would be the natural init here; keep one meaning of 'text:'.
            raise ValueError("init 'text:...' initializes K/V activations; use mode 'prefix' or 'infix' with it")

    @property
    def init_text(self) -> str:
        """The words after ``text:`` ('' for random init)."""
        return self.init[len("text:") :] if self.init.startswith("text:") else ""

    def replace(self, **changes: Any) -> PrefixConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> PrefixConfig:
        """Build from a dict, naming ``source`` and the unknown field on bad input (``ConfigError``)."""
        return dataclass_from_dict(cls, data, source)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> PrefixConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        return cls.from_dict(data, source=str(path))
