"""The engine's named prefixes: validated before anything is allocated, stored once, least recently used ones cold.

A prefix enters from a ``save_pretrained`` folder, a ``PrefixModel`` or its K/V tensor
(P, layers, 2, kv_heads, head_dim). Folders are checked the way vLLM's LoRA worker manager checks
an adapter before loading it: the config's fields and types, the base-model fingerprint, and the
safetensors header (its size, every tensor's dtype, shape and byte range) against the shapes this
prefix's config implies, all before a byte of weights is read; any failure is a ``ConfigError``
naming the folder. Each prefix is stored once, in the serving dtype; every request that uses it
holds a reference to that one tensor (the batch's KV cache copies it in, as attention needs).

Residency (S-LoRA style): at most ``max_resident`` prefixes stay on the engine's device; the least
recently used beyond that are moved to CPU memory (or, on a CPU engine, dropped and re-read from
their folder when used again; a prefix given as a tensor stays in memory).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixtune.core.checkpoint import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    compare_fingerprints,
    fingerprint,
    load_prefix_kv,
)
from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel
from prefixtune.core.prefix import PrefixEncoder
from prefixtune.core.spec import ModelSpec
from prefixtune.errors import ConfigError, UnknownPrefixError

#: Largest prefix_config.json / safetensors header read (bytes); real ones are a few KB.
MAX_HEADER_BYTES = 1 << 20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(slots=True)
class PrefixEntry:
    """One registered prefix. ``kv`` is the stored tensor (P, layers, 2, kv_heads, head_dim) or None
    when it is cold on disk; ``folder`` is where it can be read again (None for a tensor source)."""

    name: str
    length: int
    kv: torch.Tensor | None
    folder: Path | None
    nbytes: int


class PrefixRegistry:
    """Named prefixes of one base model (thread-safe); ``get`` returns the device tensor of a prefix."""

    def __init__(self, model: nn.Module, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                 max_length: int, max_resident: int | None = None) -> None:
        self.model, self.spec, self.device, self.dtype = model, spec, device, dtype
        self.max_length, self.max_resident = max_length, max_resident
        stack = spec.stack("decoder")
        #: one position of a prefix: (layers, 2, kv_heads, head_dim), or (width,) where layers differ (core/kv.py)
        self.position_shape: tuple[int, ...] = ((stack.num_layers, 2, stack.num_kv_heads, stack.head_dim)
                                                if stack.uniform else (stack.width,))
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------ adding / removing
    def add(self, name: str, source: PrefixModel | str | Path | torch.Tensor) -> int:
        """Register (or replace) ``name``; returns its length P. ConfigError names what is wrong."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"prefix name must be a non-empty string, got {name!r}")
        folder = None
        if isinstance(source, PrefixModel):
            if source.base is not self.model:
                compare_fingerprints(fingerprint(source.base), self._base_fingerprint(), f"prefix {name!r}")
            kv = source.decoder_kv()
        elif isinstance(source, str | Path):
            folder = Path(source)
            kv = self._load_folder(folder)
        else:
            kv = source
        kv = self._checked(name, kv)
        entry = PrefixEntry(name, 0 if kv is None else kv.shape[0], kv, folder,
                            0 if kv is None else kv.numel() * kv.element_size())
        with self._lock:
            self._entries.pop(name, None)
            self._entries[name] = entry
            self._evict()
        return entry.length

    def remove(self, name: str) -> None:
        """Unregister ``name``; requests already holding its tensor keep using it."""
        with self._lock:
            if self._entries.pop(name, None) is None:
                raise UnknownPrefixError(f"unknown prefix {name!r}")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def length(self, name: str) -> int:
        """P of ``name``; UnknownPrefixError if it is not registered."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise UnknownPrefixError(f"unknown prefix {name!r}")
        return entry.length

    def get(self, name: str) -> torch.Tensor | None:
        """The prefix's K/V on the engine's device (None for P = 0), marking it most recently used.

        A cold prefix is brought back (from CPU memory or its folder) and the coldest beyond
        ``max_resident`` leave the device."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownPrefixError(f"unknown prefix {name!r}")
            self._entries.move_to_end(name)
            kv, folder = entry.kv, entry.folder
        if entry.length == 0:
            return None
        if kv is None:  # cold on disk: read (and check) it again
            kv = self._checked(name, self._load_folder(folder))  # type: ignore[arg-type]
        elif kv.device != self.device:
            kv = kv.to(self.device)
        with self._lock:
            if self._entries.get(name) is entry:
                entry.kv = kv
                self._evict()
        return kv

    def memory(self) -> dict[str, int]:
        """Bytes held by resident (device) and cold (CPU) prefixes, and how many of each are held."""
        out = {"resident_bytes": 0, "resident": 0, "cold_bytes": 0, "cold": 0, "on_disk": 0}
        with self._lock:
            for e in self._entries.values():
                if e.kv is None:
                    out["on_disk"] += e.length > 0
                elif e.kv.device == self.device:
                    out["resident_bytes"] += e.nbytes
                    out["resident"] += 1
                else:
                    out["cold_bytes"] += e.nbytes
                    out["cold"] += 1
        return out

    # ------------------------------------------------------------------ internals
    def _evict(self) -> None:
        """(Lock held) move the least recently used resident prefixes off the device beyond max_resident."""
        if self.max_resident is None:
            return
        resident = [e for e in self._entries.values() if e.kv is not None and e.kv.device == self.device]
        for entry in resident[: max(0, len(resident) - self.max_resident)]:
            if self.device.type != "cpu":
                entry.kv = entry.kv.to("cpu")  # type: ignore[union-attr]
            elif entry.folder is not None:
                entry.kv = None  # read again from the folder when used
            # a CPU engine's tensor-sourced prefix has nowhere colder to go: it stays

    def _base_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def _checked(self, name: str, kv: torch.Tensor | None) -> torch.Tensor | None:
        if kv is not None and (not isinstance(kv, torch.Tensor) or kv.ndim != 1 + len(self.position_shape)
                               or tuple(kv.shape[1:]) != self.position_shape):
            shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise ValueError(f"prefix {name!r}: K/V of shape {shape}, expected (P, *{self.position_shape})")
        if kv is None or kv.shape[0] == 0:
            return None
        if kv.shape[0] > self.max_length:
            raise ValueError(f"prefix {name!r}: length {kv.shape[0]} leaves no room in the context of "
                             f"{self.max_length + 1} positions")
        return kv.detach().to(self.device, self.dtype).contiguous()

    def _load_folder(self, folder: Path) -> torch.Tensor:
        """Check ``folder`` completely (config, fingerprint, header) and only then read its K/V."""
        try:
            config = self._check_config(folder)
            self._check_header(folder, config)
            return load_prefix_kv(folder, self.model, self._base_fingerprint())
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"prefix folder {folder}: {type(exc).__name__}: {exc}") from exc

    def _check_config(self, folder: Path) -> PrefixConfig:
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: missing (is {folder} a prefixtune save?)")
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a prefix config can be")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
        return _config_from_meta(meta, path, self._base_fingerprint(), self.max_length)

    def _check_header(self, folder: Path, config: PrefixConfig) -> None:
        path = folder / WEIGHTS_NAME
        header = read_safetensors_header(path)
        with torch.device("meta"):  # the shapes this config implies, without allocating them
            encoder = PrefixEncoder(config, self.spec)
        expected = {f"{stack}.{key}": tuple(t.shape) for stack, sp in encoder.stacks.items()
                    for key, t in sp.state_dict().items()}
        found = {k: tuple(v["shape"]) for k, v in header.items()}
        if set(found) != set(expected):
            raise ConfigError(f"{path}: tensors {sorted(found)} do not match this prefix's {sorted(expected)}")
        for key, shape in expected.items():
            if found[key] != shape:
                raise ConfigError(f"{path}: tensor {key!r} has shape {list(found[key])}, but "
                                     f"{CONFIG_NAME} (prefix_length {config.prefix_length}) implies {list(shape)}")
            if header[key]["dtype"] not in _FLOAT_DTYPES:
                raise ConfigError(f"{path}: tensor {key!r} has dtype {header[key]['dtype']}, not a float type")


def _config_from_meta(meta: Any, path: Path, base: dict[str, Any], max_length: int) -> PrefixConfig:
    """The PrefixConfig of a saved prefix's JSON, with every field's type checked; ConfigError otherwise."""
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for field, kind in (("prefix_config", dict), ("base_model", dict), ("folded", bool), ("train_modules", list),
                        ("weights_sha256", str)):
        value = meta.get(field, [] if field == "train_modules" else None)
        if not isinstance(value, kind):
            raise ConfigError(f"{path}: field {field!r} must be a JSON {kind.__name__}, got {value!r}")
    if not all(isinstance(m, str) for m in meta.get("train_modules", [])):
        raise ConfigError(f"{path}: field 'train_modules' must be a list of strings")
    try:
        compare_fingerprints(meta["base_model"], base, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    raw = meta["prefix_config"]
    for f in dataclasses.fields(PrefixConfig):
        if f.name in raw and not _same_kind(raw[f.name], f.default):
            raise ConfigError(f"{path}: prefix_config.{f.name} must be a {type(f.default).__name__}, "
                                 f"got {raw[f.name]!r}")
    length = raw.get("prefix_length", 0)
    if length > max_length:
        raise ConfigError(f"{path}: prefix_config.prefix_length {length} leaves no room in the context of "
                             f"{max_length + 1} positions")
    try:
        config = PrefixConfig.from_dict(raw, source=f"{path}: prefix_config")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return config.replace(reparam=False) if meta["folded"] else config


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header, each checked against the file's real size.

    Raises ConfigError for a missing, empty, truncated or oversized file or a header that is not
    what the format says (a JSON object of {dtype, shape, data_offsets} within the data)."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path}: {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ConfigError(f"{path}: header of {n} bytes in a file of {size} (corrupt or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for key, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        if not ok:
            raise ConfigError(f"{path}: header entry {key!r} is not {{dtype, shape, data_offsets}}")
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if not 0 <= start <= end <= data or end - start != numel * _DTYPE_BYTES[info["dtype"]]:
            raise ConfigError(f"{path}: tensor {key!r} claims bytes [{start}, {end}) for shape {info['shape']} "
                                 f"in {data} bytes of data (corrupt or truncated)")
    return header
