"""PrefixTrainer under torchrun (2 gloo CPU ranks, Trainer's DDP): every checkpoint holds the prefix only, the run
ends on the prefix of one process with the same global batch, a resumed 2-rank run ends on the uninterrupted one's,
and the saved folder loads with ``prefixtune.load``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny

from prefixtune.core.model import load

pytest.importorskip("accelerate")

# Both runs in one launch (starting two ranks costs most of the time): an uninterrupted 4-step run, then a run
# stopped after step 3 and resumed from its checkpoint-2 by a fresh model.
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/.."]  # tests/integrations and tests/
    from test_trainer import _StopAt, _args, _data, _model
    from prefixtune.integrations.trainer import PrefixTrainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    settings = dict(per_device_train_batch_size=2, max_steps=4, eval_strategy="no", ddp_backend="gloo")
    full = PrefixTrainer(model=_model(), args=_args(out + "/full", **settings), train_dataset=_data())
    full.train()
    full.save_model(out + "/full/final")
    cut_args = _args(out + "/cut", **settings)
    PrefixTrainer(model=_model(), args=cut_args, train_dataset=_data(), callbacks=[_StopAt(3)]).train()
    PrefixTrainer(model=_model(), args=cut_args, train_dataset=_data()).train(
        resume_from_checkpoint=out + "/cut/checkpoint-2")
    torch.distributed.barrier()
    """
)


def test_trainer_ddp_on_two_ranks_saves_the_prefix_only_and_matches_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    tests_dir = str(Path(__file__).resolve().parent)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), tests_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    from test_trainer import _args, _data, _model

    from prefixtune.integrations.trainer import PrefixTrainer

    one = _model()
    PrefixTrainer(model=one, args=_args(tmp_path / "one", per_device_train_batch_size=4, max_steps=4,
                                        eval_strategy="no"), train_dataset=_data()).train()
    expected = {k: v.detach() for k, v in one.state_dict().items()}

    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in (tmp_path / "full").glob("checkpoint-*"):
        assert set(load_file(ckpt / "model.safetensors")) == set(expected)
    ddp = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "checkpoint-4" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5)  # gradients summed in another order
        torch.testing.assert_close(resumed[key], ddp[key], rtol=0, atol=1e-6)

    pm = load(tmp_path / "full" / "final", tiny("llama"))
    for key, value in pm.state_dict().items():
        torch.testing.assert_close(value, ddp[key], rtol=0, atol=0)
