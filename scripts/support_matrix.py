"""Write docs/support.md: every causal-LM, encoder and encoder-decoder model type of transformers, supported or not.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built from its config
(``tests/tiny_models.tiny_causal_lm``: 2 layers, width 32) and checked against the real-token rule
(``tests/reference.real_token_equivalence``: logits and greedy tokens of a prefix initialized from
t0's own K/V equal the base model's after [t0; x]). Beside it, PEFT's prefix tuning is run on the same
tiny model (forward + 2 greedy tokens without an exception; PEFT makes no equivalence claim), and, for the
supported ones, the serving engine against ``PrefixModel.generate`` (``_engine``).
Then every encoder family is checked for P-tuning v2 (``check_encoder``) and every encoder-decoder for its
three prefixes (``check_seq2seq``). Each type runs in its own forked
process (memory and time limits), one at a time.

    .venv/bin/python scripts/support_matrix.py [--out docs/support.md] [--json raw.json]
    .venv/bin/python scripts/support_matrix.py --merge raw.json --types diffllama --seq2seq-types t5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

TEST = "tests/core/test_every_architecture.py::test_prefix_from_real_tokens_equals_those_tokens"


DECISIONS = [
    "How types are decided (by mechanism, `src/prefixtune/core/spec.py`):",
    "",
    "- attention through transformers' attention interface: the prefix is put in front of each layer's keys and",
    "  values inside the attention call; K/V heads and head dims are read from the tensors of one probe forward",
    "  (GQA, fused QKV, MLA's differing K and V dims, per-layer dims);",
    "- attention computed inside a module of its own (OpenAI GPT, XLM; the encoders below): a shim in",
    "  `core/shims.py` (`LEGACY_ATTENTION`) replaces its attention method by the same arithmetic through the",
    "  interface while the prefix is attached;",
    "- one module making several attention calls over one K/V (DiffLlama's two softmaxes over a split V): the",
    "  model's own cache, which holds that K/V once, carries the prefix (the cache route below);",
    "- decoder-only models outside the interface, or whose positions do not come from `position_ids`: the prefix",
    "  is written into the model's own `DynamicCache` as P past positions (PEFT's route);",
    "  The cache route keeps the model's attention implementation as it was (Falcon reads its name), hands no",
    "  cache back from a call made without one (MPT: `use_cache=False`, so generate re-feeds the sequence), gives",
    "  a forward without `position_ids` positions from the attention mask (as generate's), and, for RoBERTa-like",
    "  embeddings (positions from padding_idx + 1, where generate passes 0, 1, ...), `PrefixModel.generate`",
    "  passes the model's own numbering; where the model numbers key positions by index (MPT's ALiBi, RoFormer,",
    "  BART-like learned positions), left-padded batches with a prefix are refused at the call (the padding",
    "  would sit between the prefix and the row's tokens);",
    "- Doge's dynamic mask attention: the prefix keys get the per-key bias computed from their own values (as",
    "  cached values would), inside its keep_window_size (past it the call is refused);",
    "- layers that reuse another layer's K/V (Gemma 3n) get their own prefix slot, initialized from the K/V",
    "  they reuse, so the real-token rule holds and training may let them differ;",
    "- recurrent / hybrid models (Mamba, linear attention, short convolutions: Jamba, Bamba, Zamba, Falcon-H1,",
    "  LFM2, Qwen3-Next, ...) are refused: K/V on their attention layers would not act as real past tokens,",
    "  because the recurrent state of those tokens is missing;",
    "- attention whose cache keeps a convolution / recurrent state beside K/V (Zaya's CCA) is refused: that",
    "  state of real past tokens is not K/V;",
    "- a causal LM whose forward lets a position see later ones is refused, found by a probe, not by name (the",
    "  first position's output, compared bit for bit, changes when the tokens after it do): CPM-Ant's, and",
    "  XLNet's as built with attn_type='bi', attend both ways over the whole input; ProphetNet's logits come",
    "  from its predict streams, whose relative position bias transformers gathers through a reshape that mixes",
    "  positions, so position 0 reads later tokens' hidden states (1e-7 to 6e-7 at a tiny model's initialization).",
    "  A causal loss would see its labels, and no prefix acts as past tokens of such a sequence;",
    "- indexed sparse attention (DeepSeek V3.2, GLM DSA, ...): the indexer picks index_topk of the real keys for",
    "  each query; the prefix has no indexer keys and stays visible to every query. While the context is within",
    "  index_topk (the indexer picks every key) this equals P real past tokens; past it, `PrefixModel.forward`",
    "  and `generate` agree (`tests/core/test_every_architecture.py::test_indexed_sparse_attention_past_`",
    "  `index_topk_forward_and_generate_agree`);",
    "- the serving engine writes prefixes into the model's own KV cache: it serves layers of different K/V",
    "  shapes, and refuses models whose cache holds other than the K/V their attention reads (multi-head latent",
    "  attention's compressed latent: DeepSeek V2 / V3 / V3.2, MiniCPM3, ...; JetMoE's fewer heads; Gemma 3n's",
    "  shared layers), which `PrefixModel.generate` serves;",
    "- sliding windows: the prefix always stays visible (it never slides out); inside the window this equals",
    "  P real past tokens; `PrefixModel.forward` and `generate` agree past it",
    "  (`tests/core/test_audit.py::test_beyond_the_sliding_window_forward_and_generate_agree_`",
    "  `the_prefix_stays_visible`);",
    "- `flash_attention_2` is refused (untestable on this project's machines); `sdpa`, `eager` and",
    "  `flex_attention` (decoder-only; unfused on the CPU) are supported; static caches with `sdpa` and `eager`",
    "  (transformers 5.23's generate fails on a static cache with flex by itself, prefix or not).",
    "",
    "'not built' types are families whose default config does not shrink to the tiny sizes here (or need a package",
    "that is not installed); they are not claimed either way.",
]


def _reason(message: str) -> str:
    """A short class of refusal, for the counts."""
    if "attention interface" in message:
        return "attention not through the interface"
    if "not a causal language model" in message:
        return "forward not causal"
    if "indexed (sparse) attention" in message:
        return "indexed sparse attention"
    if "beside the keys and values" in message:
        return "convolution / recurrent state in the attention cache"
    if "recurrent" in message:
        return "recurrent / hybrid layers"
    if "called more than once" in message:
        return "shared layers"
    if "no token embedding table" in message:
        return "no token embedding table"
    if "the probe forward" in message:
        return "fails on a short input"
    if "attn_implementation" in message:
        return "attention implementation"
    return "fails the real-token check" if message.startswith("AssertionError") else "error"


def check(model_type: str) -> dict:
    """One type: build, prefixtune's real-token rule, PEFT's prefix tuning."""
    import warnings

    from reference import real_token_equivalence
    from tiny_models import tiny_causal_lm

    from prefixtune.core.spec import read_spec

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict = {"class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}
    try:
        model = tiny_causal_lm(model_type)
        model(input_ids=torch.tensor([[5, 6, 7]]))
    except Exception as exc:  # the family does not build from its default config shrunk
        out["build"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return out
    try:
        read_spec(model)
        out["result"] = real_token_equivalence(model)
        out["status"] = "supported"
    except ValueError as exc:
        out["status"], out["reason"] = "refused", str(exc)[:300]
    except Exception as exc:
        out["status"], out["reason"] = "fails", f"{type(exc).__name__}: {str(exc)[:240]}"
    out["peft"] = _peft(model_type)
    if out["status"] == "supported":
        out["engine"] = _engine(model_type)
    return out


def _engine(model_type: str) -> str:
    """The serving engine on this type: "exact" when its greedy tokens for three prompts of mixed lengths sharing
    one prefix equal ``PrefixModel.generate``'s (default config, and grouped prefill), else why not."""
    from tiny_models import VOCAB, tiny_causal_lm

    from prefixtune import PrefixConfig, attach
    from prefixtune.serving.engine import Engine, EngineConfig
    from prefixtune.serving.sampling import SamplingParams

    model = tiny_causal_lm(model_type)
    gen = model.generation_config  # plain greedy on both sides: no EOS, no forced tokens (BART forces EOS)
    gen.eos_token_id = gen.forced_eos_token_id = gen.forced_bos_token_id = None
    try:
        engine = Engine(model)
    except ValueError as exc:
        return f"refused: {exc}"
    g = torch.Generator().manual_seed(0)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.normal_(0, 1, generator=g)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 7)]
    want = [pm.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=6, do_sample=False)[0, len(p):].tolist() for p in prompts]
    engine.add_prefix("x", pm)
    kv = engine.prefixes.get("x")
    pm.detach()
    for config in (EngineConfig(), EngineConfig(prefill="grouped", max_prefill_padding=1e9)):
        served = Engine(model, config)
        served.add_prefix("x", kv)
        if served.generate(prompts, SamplingParams(max_new_tokens=6), ["x"] * 3) != want:
            return f"differs (prefill={config.prefill})"
    return "exact" + (" (requests alone)" if served.rows_alone else "")


ENCODER_TEST = "tests/core/test_encoders_by_mechanism.py"


def encoder_types() -> list[str]:
    """Encoder families: sequence-classification types that also have a masked-LM head, not encoder-decoders."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    both = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) & set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return [t for t in sorted(both) if not getattr(AutoConfig.for_model(t), "is_encoder_decoder", False)]


def check_encoder(model_type: str) -> dict:
    """One encoder type, as a classifier (P-tuning v2): disabled = base, a padded row = the row alone, the
    prefix changes the logits; beside it PEFT's prefix tuning (SEQ_CLS)."""
    import warnings

    from tiny_models import VOCAB, tiny_config

    from prefixtune import PrefixConfig, attach

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict = {"class": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type]}
    ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])

    def build():
        torch.manual_seed(0)
        return getattr(transformers, out["class"])(tiny_config(model_type)).eval()

    try:
        with torch.no_grad():
            model = build()
            base = model(input_ids=ids, attention_mask=mask).logits
    except Exception as exc:
        out["build"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return out
    try:
        pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
        if pm.spec.kind != "encoder":
            raise ValueError(f"read as {pm.spec.kind}, not as an encoder")
        with torch.no_grad():
            with pm.disabled():
                off = float((pm(input_ids=ids, attention_mask=mask).logits - base).abs().max())
            pm.prefix.stacks["encoder"].table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
            both = pm(input_ids=ids, attention_mask=mask).logits
            alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
        pad, change = float((both[1:] - alone).abs().max()), float((both - base).abs().max())
        out["result"] = {"disabled": off, "padded_row": pad, "change": change}
        ok = off < 1e-4 and pad < 1e-4 and change > 1e-3
        out["status"] = "supported" if ok else "fails"
        if not ok:
            out["reason"] = f"disabled {off:.1e}, padded row {pad:.1e}, change {change:.1e}"
    except ValueError as exc:
        out["status"], out["reason"] = "refused", str(exc)[:300]
    except Exception as exc:
        out["status"], out["reason"] = "fails", f"{type(exc).__name__}: {str(exc)[:240]}"
    try:
        from peft import PrefixTuningConfig, get_peft_model

        get_peft_model(build(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))(
            input_ids=ids, attention_mask=mask)
        out["peft"] = "runs"
    except Exception as exc:
        out["peft"] = f"fails ({type(exc).__name__})"
    return out


SEQ2SEQ_TEST = "tests/core/test_seq2seq_by_mechanism.py"


def seq2seq_types() -> list[str]:
    """Encoder-decoder text families: seq2seq LM types whose default config is an encoder-decoder."""
    from transformers import AutoConfig

    return [t for t in sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
            if getattr(AutoConfig.for_model(t), "is_encoder_decoder", False)]


def check_seq2seq(model_type: str) -> dict:
    """One encoder-decoder type: ``reference.seq2seq_contract``; beside it PEFT's prefix tuning (SEQ_2_SEQ_LM)."""
    import warnings

    from reference import seq2seq_contract
    from tiny_models import tiny_seq2seq_lm

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict = {"class": MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[model_type]}
    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        model = tiny_seq2seq_lm(model_type)
        with torch.no_grad():
            model(input_ids=ids, decoder_input_ids=ids[:, :2])
    except Exception as exc:
        out["build"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return out
    try:
        out["result"] = seq2seq_contract(model)
        out["status"] = "supported"
    except ValueError as exc:
        out["status"], out["reason"] = "refused", str(exc)[:300]
    except Exception as exc:
        out["status"], out["reason"] = "fails", f"{type(exc).__name__}: {str(exc)[:240]}"
    try:
        from peft import PrefixTuningConfig, get_peft_model

        peft_model = get_peft_model(tiny_seq2seq_lm(model_type), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                                     num_virtual_tokens=4))
        peft_model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        out["peft"] = "runs"
    except Exception as exc:
        out["peft"] = f"fails ({type(exc).__name__})"
    return out


def _peft(model_type: str) -> str:
    from tiny_models import tiny_causal_lm

    try:
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(tiny_causal_lm(model_type), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=4))
        ids = torch.tensor([[5, 6, 7]])
        model(input_ids=ids)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        return "runs"
    except Exception as exc:
        return f"fails ({type(exc).__name__})"


def forked(fn, arg: str, timeout: int = 180, mem_gb: int = 14) -> dict:
    """``fn(arg)`` in a child process with an address-space and time limit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        resource.setrlimit(resource.RLIMIT_AS, (mem_gb << 30, mem_gb << 30))
        signal.alarm(timeout)
        try:
            data = fn(arg)
        except BaseException as exc:
            data = {"build": f"{type(exc).__name__}: {str(exc)[:200]}"}
        os.write(w, json.dumps(data).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks)) if chunks else {"build": f"killed (over {timeout} s or {mem_gb} GiB)"}


def render(results: dict[str, dict], encoders: dict[str, dict], seq2seq: dict[str, dict]) -> str:
    built, counts, reasons, peft, both = _tally(results)
    served = [r.get("engine", "") for r in built.values() if r["status"] == "supported"]
    engine = {"exact": sum(e.startswith("exact") for e in served), "alone": sum("alone" in e for e in served),
              "refused": sum(e.startswith("refused") for e in served),
              "differs": sum(not e.startswith(("exact", "refused")) for e in served)}
    lines = [
        "# Supported models",
        "",
        f"Written by `scripts/support_matrix.py` from transformers {transformers.__version__} (do not edit by hand).",
        f"Of {len(results)} causal-LM model types, {len(built)} build from a tiny config. Of those:",
        "",
        f"- **supported: {counts['supported']}**: a prefix initialized from the model's own K/V of real tokens t0",
        "  gives the base model's logits and greedy tokens after [t0; x], proven by",
        f"  `{TEST}`;",
        *_refused_lines(counts, reasons),
        f"- PEFT {_peft_version()} prefix tuning runs (no equivalence claimed) on {peft} of them "
        f"({both} of those are also supported here);",
        f"- the serving engine gives `PrefixModel.generate`'s greedy tokens on {engine['exact']} of the supported "
        f"types ({engine['alone']} of them with each request in a batch of its own), refuses {engine['refused']} "
        f"with the reason, and differs on {engine['differs']}.",
        "",
        *DECISIONS,
        "",
        "| model type | class | prefixtune | reason | PEFT prefix tuning | serving engine |",
        "|---|---|---|---|---|---|",
    ]
    lines += _rows(results, engine=True)
    return "\n".join(lines + render_encoders(encoders) + render_seq2seq(seq2seq)) + "\n"


def _rows(results: dict[str, dict], engine: bool = False) -> list[str]:
    lines = []
    for t, r in sorted(results.items()):
        extra = f" {_cell(r.get('engine', ''))} |" if engine else ""
        if "build" in r:
            lines.append(f"| {t} | {r.get('class', '')} | not built | {_cell(r['build'])} | |" + extra)
        else:
            reason = "" if r["status"] == "supported" else _cell(r["reason"])
            lines.append(f"| {t} | {r['class']} | {r['status']} | {reason} | {r['peft']} |" + extra)
    return lines


def _refused_lines(counts: Counter, reasons: Counter) -> list[str]:
    """A section's refused / failed counts and its refusals by reason."""
    return [f"- refused: {counts['refused']}, with the reason in the error; fails the check: {counts['fails']};",
            "  by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ";"]


def _tally(results: dict[str, dict]) -> tuple[dict[str, dict], Counter, Counter, int, int]:
    """The built types, their statuses, refusal reasons, PEFT's runs and the types both run."""
    built = {t: r for t, r in results.items() if "build" not in r}
    counts = Counter(r["status"] for r in built.values())
    reasons = Counter(_reason(r["reason"]) for r in built.values() if r["status"] != "supported")
    peft = sum(r["peft"] == "runs" for r in built.values())
    both = sum(r["status"] == "supported" and r["peft"] == "runs" for r in built.values())
    return built, counts, reasons, peft, both


def render_seq2seq(results: dict[str, dict]) -> list[str]:
    """The encoder-decoder section: encoder, decoder and cross prefixes on every encoder-decoder family."""
    if not results:
        return []
    built, counts, reasons, peft, both = _tally(results)
    return [
        "",
        "## Encoder-decoders",
        "",
        f"Of {len(results)} encoder-decoder model types (seq2seq LM, encoder-decoder config), {len(built)} build",
        "from a tiny config. Of those:",
        "",
        f"- **supported: {counts['supported']}**: encoder self-, decoder self- and cross-attention each carry a",
        "  prefix; disabled it gives the base logits, a right-padded source row gives the row alone, the prefix",
        "  changes the logits and cached greedy generation equals full recomputation",
        f"  (`tests/reference.seq2seq_contract`, over every supported type in `{SEQ2SEQ_TEST}`; every",
        "  attention against a hand-written one for BART and T5 in `tests/core/test_model.py`);",
        *_refused_lines(counts, reasons),
        f"- PEFT {_peft_version()} prefix tuning (SEQ_2_SEQ_LM) generates on {peft} of them ({both} of those "
        "also supported here).",
        "",
        "An encoder-decoder whose encoder (or decoder) attention runs outside the interface (BigBird-Pegasus's",
        "block-sparse and Pegasus-X's block-local encoders) is refused rather than given prefixes on some stacks",
        "only. LongT5's local and transient-global encoders run their blocks through the interface by a shim",
        "(`core/shims.py`): every query block sees the prefix (no bias), as the prefix of a sliding window stays",
        "visible; its first layer is checked against full attention with the band mask written out.",
        "",
        "| model type | class | prefixtune | reason | PEFT prefix tuning |",
        "|---|---|---|---|---|",
        *_rows(results),
    ]


def render_encoders(results: dict[str, dict]) -> list[str]:
    """The encoder section: P-tuning v2 on every encoder family (sequence classification)."""
    if not results:
        return []
    built, counts, reasons, peft, both = _tally(results)
    return [
        "",
        "## Encoders (P-tuning v2)",
        "",
        f"Of {len(results)} encoder model types (sequence classification with a masked-LM head, not",
        f"encoder-decoders), {len(built)} build from a tiny config. Of those:",
        "",
        f"- **supported: {counts['supported']}**: as a classifier with a prefix in every layer, disabled it gives",
        "  the base logits, a padded row gives the row alone and the prefix changes the logits (every layer",
        f"  against a hand-written attention in `{ENCODER_TEST}` for the shimmed families, and in",
        "  `tests/core/test_encoders.py` for BERT / DistilBERT);",
        *_refused_lines(counts, reasons),
        f"- PEFT {_peft_version()} prefix tuning (SEQ_CLS) runs on {peft} of them ({both} of those also "
        "supported here).",
        "",
        "Classic BERT self-attention that computes its scores itself (RemBERT, MegatronBERT, TAPAS, RoFormer),",
        "MPNet (its relative position bias), DeBERTa v1, v2 and v3 (the disentangled c2p / p2c bias, also with",
        "the released settings) and XLM / FlauBERT run through the interface by a shim while attached",
        "(`core/shims.LEGACY_ATTENTION`); position biases cover the real columns only, so the prefix columns",
        "get content scores alone (they have no position, as with T5). An encoder has no real-token rule (its",
        "tokens would see the prefix tokens' own states change with x); the checks above are its contract.",
        "Refused: attention that is approximate or not softmax over keys (MRA, Nystromformer, YOSO, FNet's",
        "Fourier mixing), computed inside modules no shim covers yet (ConvBERT's span convolution, LUKE's",
        "entity-aware attention, Longformer's and BigBird's sparse patterns), families without a token",
        "embedding table, and DeBERTa with talking heads. ALBERT's one attention module, shared by every layer,",
        "gets one prefix per layer, by call order.",
        "",
        "| model type | class | prefixtune | reason | PEFT prefix tuning |",
        "|---|---|---|---|---|",
        *_rows(results),
    ]


def _peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except ImportError:
        return "(not installed)"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "support.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--types", nargs="*", default=None, help="causal-LM types (default: all)")
    parser.add_argument("--encoder-types", nargs="*", default=None, help="encoder types (default: all)")
    parser.add_argument("--seq2seq-types", nargs="*", default=None, help="encoder-decoder types (default: all)")
    parser.add_argument("--merge", default=None, help="start from these raw results (--json of an earlier run)")
    args = parser.parse_args()
    import peft  # noqa: F401  (imported once here, so that each forked child starts warm)
    import reference  # noqa: F401
    import tiny_models  # noqa: F401

    import prefixtune.core.model  # noqa: F401
    merged = json.loads(Path(args.merge).read_text()) if args.merge else {}
    if merged and "causal" not in merged:  # an earlier run's flat causal results
        merged = {"causal": merged}
    results, encoders, seq2seq = merged.get("causal", {}), merged.get("encoder", {}), merged.get("seq2seq", {})
    if not args.merge or args.types is not None:
        todo = [(t, check, results) for t in (args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))]
    else:
        todo = []
    if not args.merge or args.encoder_types is not None:
        todo += [(t, check_encoder, encoders) for t in (args.encoder_types or encoder_types())]
    if not args.merge or args.seq2seq_types is not None:
        todo += [(t, check_seq2seq, seq2seq) for t in (args.seq2seq_types or seq2seq_types())]
    for t, fn, into in todo:
        start = time.time()
        into[t] = r = forked(fn, t)
        print(f"{t:28s} {r.get('status', 'not built'):10s} peft={r.get('peft', '-'):18s} {time.time() - start:5.1f}s "
              f"{(r.get('reason') or r.get('build') or '')[:110]}", flush=True)
    text = render(results, encoders, seq2seq)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"causal": results, "encoder": encoders, "seq2seq": seq2seq}, indent=1))
    print(text.split("| model type")[0])
    for section in ("## Encoders (", "## Encoder-decoders"):
        print(section + text.split(section)[-1].split("| model type")[0])


if __name__ == "__main__":
    main()
