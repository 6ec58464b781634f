"""Several ranks on torch.distributed (gloo, CPU): `torchrun -m prefixtune train` ends with the prefix of one
process with the same global batch; a killed 2-rank run resumes (on 2 ranks or on 1) to the same prefix;
only rank 0 writes; evaluation is split over ranks and gathered in source order; FSDP shards the frozen base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model_dir

from prefixtune.cli import main
from prefixtune.core.model import load
from prefixtune.errors import MeteorUnavailableError
from prefixtune.io.hub import load_causal_lm
from prefixtune.training import distributed
from prefixtune.training.loop import LOG_NAME, STATE_NAME, _accumulation_window

# 9 examples in global batches of 4 (2 per rank): shares 2+2, 2+2, then 1+0 (rank 1 has none and reruns one
# with weight 0); targets of different lengths, so ranks hold different token counts; prefix dropout on, so
# the ranks' random streams must stay together; 4 epochs × 2 steps (accumulating 2 global batches, then 1).
ARGS = ["--train-limit", "9", "--dev-split", "dev", "--dev-limit", "5", "--eval-every", "2", "--epochs", "4",
        "--grad-accum", "2", "--prefix-length", "3", "--reparam-hidden", "16", "--lr", "1e-2",
        "--prefix-dropout", "0.1", "--checkpoint-every", "2", "--seed", "3"]
STEPS = 8

KILL_AT_5 = textwrap.dedent(
    """
    import os, signal, sys
    from prefixtune.training import distributed
    from prefixtune.training import pipeline
    from prefixtune.cli import main
    from prefixtune.training.loop import fit

    def kill_at_5(state):
        if state.step == 5 and distributed.rank() == 0:  # after step 5, which is not checkpointed (every 2)
            os.kill(os.getpid(), signal.SIGKILL)

    pipeline.fit = lambda *args, **kwargs: fit(*args, on_step=kill_at_5, **kwargs)
    sys.exit(main(sys.argv[1:]))
    """
)

WITHOUT_METEOR = textwrap.dedent(
    """
    import sys
    from prefixtune.errors import MeteorUnavailableError
    from prefixtune.tasks.metrics import java_meteor
    from prefixtune.cli import main

    def no_java(*args, **kwargs):
        raise MeteorUnavailableError("left out in this test")

    java_meteor.MeteorScorer = no_java
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_model_dir(root / "model", initializer_range=0.5)  # greedy outputs differ by source
    data = root / "toy.jsonl"
    rows = [{"source": f"name : {n} | food : {f}", "target": f"{n} serves {f}."}
            for n in ("Aro", "Bib", "Cot", "Dax") for f in ("fish", "rice", "tea", "lamb stew")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ["--model", model, "--data", str(data)]


def _torchrun(*args: str, script: Path | None = None, log_dir: Path | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Two gloo ranks on this machine, running ``python -m prefixtune ARGS`` (or ``script ARGS``); with
    ``log_dir``, each rank's stdout and stderr go to files there instead."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd += [str(script), *args] if script else ["-m", "prefixtune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _train(setup, out: Path, *extra: str) -> list[str]:
    return ["train", *setup[1], *ARGS, "--out", str(out), *extra]


def _state_params(run: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of a run's last resume state (unfolded prefix)."""
    meta = json.loads((run / STATE_NAME).read_text())
    return {k: v for k, v in load_file(str(run / meta["tensors"])).items() if k.startswith("param.")}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]


def _assert_same_prefix(a: Path, b: Path, exact: bool = False) -> None:
    pa, pb = _state_params(a), _state_params(b)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        if exact:
            assert torch.equal(pa[k], pb[k]), k
        else:
            torch.testing.assert_close(pb[k], pa[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(setup):
    """One process with a batch of 4: the reference for two ranks with 2 each."""
    out = setup[0] / "single"
    assert main(_train(setup, out, "--batch-size", "4")) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(setup):
    out = setup[0] / "two"
    logs = setup[0] / "two-logs"
    proc = _torchrun(*_train(setup, out, "--batch-size", "2"), log_dir=logs)
    streams = {(int(f.parent.name), f.stem): f.read_text() for f in logs.glob("**/[01]/std*.log")}
    assert proc.returncode == 0, streams.get((0, "stderr"), proc.stderr)[-3000:]
    return out, streams


def test_two_ranks_end_with_the_prefix_of_one_process_with_the_same_global_batch(single, two_ranks):
    two, _ = two_ranks
    _assert_same_prefix(single, two)
    a, b = _log(single), _log(two)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b, strict=True):  # train loss of the global batch, and the dev loss over all ranks
        for key in ("loss", "dev_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    state_a, state_b = (json.loads((r / STATE_NAME).read_text())["trainer"] for r in (single, two))
    assert state_b["step"] == state_a["step"] == STEPS and state_b["best_step"] == state_a["best_step"]
    assert state_b["micro_step"] == state_a["micro_step"] == 4 * 3  # global batches, not per-rank ones


def test_only_rank_0_writes_logs_checkpoints_and_output(two_ranks):
    two, streams = two_ranks
    steps = [r["step"] for r in _log(two)]
    assert steps == [2, 4, 6, 8, 8]  # dev evaluations at 2, 4, 6, 8; the train-loss line at the end
    assert len(list(two.glob("state-*.safetensors"))) == 1 and (two / "best" / "prefix.safetensors").is_file()
    assert not list(two.glob("**/*.tmp"))
    assert len(streams) == 4  # stdout and stderr of ranks 0 and 1
    assert json.loads(streams[0, "stdout"])["steps"] == STEPS and streams[1, "stdout"] == ""  # one summary
    assert "train:" in streams[0, "stderr"] and "train:" not in streams[1, "stderr"]  # one progress bar
    record = json.loads((two / "run.json").read_text())
    assert record["distributed"] == {"world_size": 2, "global_batch_size": 4, "effective_batch_size": 8,
                                     "fsdp": False}


def test_a_killed_two_rank_run_resumes_on_two_ranks_or_one(setup, two_ranks, single, tmp_path):
    two, _ = two_ranks
    script = tmp_path / "kill_at_5.py"
    script.write_text(KILL_AT_5)
    out = tmp_path / "killed"
    proc = _torchrun(*_train(setup, out, "--batch-size", "2"), script=script)
    assert proc.returncode != 0 and "Signal 9" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert json.loads((out / STATE_NAME).read_text())["trainer"]["step"] == 4  # step 5 is replayed
    copy = tmp_path / "killed-copy"
    shutil.copytree(out, copy)

    proc = _torchrun(*_train(setup, out, "--batch-size", "2", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_prefix(two, out, exact=True)  # the same computation as the uninterrupted 2-rank run
    assert [r["step"] for r in _log(out)] == [r["step"] for r in _log(two)]  # no duplicate or missing lines

    # one process continues the 2-rank run when it keeps the global batch (4 = 4 × 1, not 2 × 1)
    assert main(_train(setup, copy, "--batch-size", "2", "--resume")) == 2
    assert main(_train(setup, copy, "--batch-size", "4", "--resume")) == 0
    _assert_same_prefix(single, copy)
    _assert_same_prefix(two, copy)


def test_resume_on_another_global_batch_is_refused_naming_the_fix(setup, single, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(single, out)
    assert main(_train(setup, out, "--batch-size", "2", "--resume")) == 2
    assert "global batch (--batch-size × ranks): saved 4, now 2 × 1 = 2" in capsys.readouterr().err
    (out / "run.json").unlink()  # the training loop checks its own state too
    assert main(_train(setup, out, "--batch-size", "2", "--resume")) == 2
    assert "pass --batch-size 4 to resume on 1 rank(s)" in capsys.readouterr().err


def test_sharded_eval_gathers_predictions_in_source_order(setup, single, tmp_path, capsys, monkeypatch):
    from prefixtune.tasks.metrics import java_meteor

    def no_java(*args, **kwargs):
        raise MeteorUnavailableError("left out in this test")

    # METEOR (java, seconds per call) is left out here and in the 2-rank run below: the order is the subject
    monkeypatch.setattr(java_meteor, "MeteorScorer", no_java)
    args = ["eval", str(single), "--data", setup[1][3], "--split", "all", "--max-new-tokens", "6",
            "--batch-size", "3"]
    assert main([*args, "--predictions", str(tmp_path / "one.txt")]) == 0
    one = json.loads(capsys.readouterr().out)
    script = tmp_path / "without_meteor.py"
    script.write_text(WITHOUT_METEOR)
    proc = _torchrun(*args, "--predictions", str(tmp_path / "two.txt"), script=script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "two.txt").read_text().splitlines()
    assert lines == (tmp_path / "one.txt").read_text().splitlines() and len(lines) == 16
    assert len(set(lines)) >= 8  # the order is visible: outputs differ from source to source
    assert proc.stdout.count('"BLEU"') == 1 and json.loads(proc.stdout)["BLEU"] == one["BLEU"]


def test_fsdp_shards_the_frozen_base_and_trains_the_same_prefix(setup, single, tmp_path):
    out = tmp_path / "fsdp"
    proc = _torchrun(*_train(setup, out, "--batch-size", "2", "--fsdp", "--gradient-checkpointing"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())["distributed"]
    # the tiny Llama has 2 blocks; the last holds the weights that fingerprint the base model, and stays whole
    assert record["fsdp"] and record["sharded_blocks"] == ["model.layers.0"]
    _assert_same_prefix(single, out)


def test_rank_shares_are_contiguous_and_accumulation_windows_stop_at_epoch_ends():
    assert [list(distributed.shard_range(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(distributed.shard_range(1, r, 2)) for r in range(2)] == [[0], []]
    assert [len(distributed.shard_range(10, r, 4)) for r in range(4)] == [3, 3, 2, 2]
    assert distributed.shard_range(7) == range(7)  # one process takes everything
    assert distributed.map_in_order(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]
    # 3 global batches per epoch, accumulating 2: steps take (0, 1), (2), then the next epoch's (0, 1)
    assert _accumulation_window(0, 3, 2) == [(0, 0), (0, 1)]
    assert _accumulation_window(2, 3, 2) == [(0, 2)]
    assert _accumulation_window(3, 3, 2) == [(1, 0), (1, 1)]


RANK_0_FAILS = textwrap.dedent(
    """
    import sys
    from prefixtune.training import distributed

    class Unpicklable(Exception):  # two required arguments: pickle cannot rebuild it on another rank
        def __init__(self, what, where):
            super().__init__(f"{what} at {where}")

    def fail():
        raise Unpicklable("disk full", sys.argv[1])

    distributed.init_from_env()
    try:
        distributed.on_main(fail)
    except Exception as exc:
        print(f"rank {distributed.rank()}: {type(exc).__name__}: {exc}", flush=True)
    distributed.barrier()  # both ranks got here: none waits at the broadcast
    distributed.close()
    """
)


def test_any_error_of_rank_0_reaches_every_rank_with_its_type_and_message(tmp_path):
    script = tmp_path / "rank_0_fails.py"
    script.write_text(RANK_0_FAILS)
    proc = _torchrun("/runs/x", script=script, log_dir=tmp_path / "logs", timeout=120)  # before: waited for ever
    streams = {int(f.parent.name): f.read_text() for f in (tmp_path / "logs").glob("**/[01]/stdout.log")}
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert streams[0].strip() == "rank 0: Unpicklable: disk full at /runs/x"
    assert streams[1].strip() == "rank 1: RankFailedError: rank 0 failed with Unpicklable: disk full at /runs/x"


def test_an_fsdp_run_saves_a_best_prefix_that_loads_on_the_unsharded_base(setup, tmp_path):
    # the fingerprint saved with best/ covers every base tensor: it must be taken before the blocks are sharded
    out = tmp_path / "fsdp-best"
    proc = _torchrun("train", *setup[1], "--dev-split", "none", "--max-steps", "2", "--batch-size", "2",
                     "--eval-every", "1", "--prefix-length", "3", "--out", str(out), "--fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, _ = load_causal_lm(setup[1][1])
    pm = load(out / "best", base)
    assert pm.prefix_config.prefix_length == 3
