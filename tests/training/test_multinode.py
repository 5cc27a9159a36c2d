"""Two nodes on one machine: two `torchrun --nnodes 2 --node_rank R` launches of `train.py`, compared
with one `python train.py` on 2 processes (Lightning's own launcher) at the same global batch.

Lightning picks the job's shape up from torchrun (``TorchElasticEnvironment``). Here both "nodes"
share one disk, as nodes share a cluster file system; a node-local cache is simulated by giving each
node its own ``LM_LAB_CACHE``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHAKESPEARE
from tests.training.test_distributed import GPT, TOL, assert_same_curves, metrics, samples_per_step, trace, train

TRAIN = str(REPO / "train.py")
STEPS = 12
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"]  # trainer=ddp's bf16 is for GPUs
NODES = [*CPU_DDP, "trainer.num_nodes=2", "trainer.devices=1"]
ARGS = [
    *GPT,
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.val_check_interval=4",
    f"trainer.max_steps={STEPS}",
    f"scheduler.decay_steps={STEPS}",
]

pytestmark = pytest.mark.slow  # several multi-process runs each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_20k.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(args: list[str], run_dir: Path, caches: list[Path]) -> list[subprocess.Popen]:
    """Both nodes' torchrun, each in a session of its own (so that a kill reaches its worker)."""
    port = free_port()
    procs = []
    for rank, cache in enumerate(caches):
        env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd += [TRAIN, *args, f"hydra.run.dir={run_dir}"]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=run_dir.parent,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]
        outs.append(out)
    return outs


def report(name: str, a: Path, b: Path, key: str = "train/loss") -> None:
    """Print the largest per-step difference (the figure docs/distributed.md quotes; run with -s)."""
    ma, mb = metrics(a)[key], metrics(b)[key]
    diff = max(abs(ma[s] - mb[s]) for s in set(ma) & set(mb))
    print(f"\n{name}: {key} max |difference| over {len(set(ma) & set(mb))} steps {diff:.1e}")


def entries(directory: Path) -> list[Path]:
    """Cache entries (not the lock files beside them)."""
    return [p for p in directory.iterdir() if not p.name.startswith(".")]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL both nodes whole (torchrun and its worker), as a node failure would."""
    pids = [pid for p in procs for pid in (p.pid, *descendants(p.pid))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.communicate()


@pytest.fixture(scope="module")
def one_node(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one `python train.py` with 2 processes (Lightning's launcher)."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    train([*ARGS, f"data.data_files={corpus}", *CPU_DDP, "trainer.devices=2"], run, tmp_path_factory.mktemp("cache"))
    return run


def test_two_torchrun_nodes_train_like_one_node_and_write_the_run_once(
    corpus: Path, one_node: Path, tmp_path: Path
) -> None:
    run, cache = tmp_path / "two_nodes", tmp_path / "cache"
    outs = finish(start_nodes([*ARGS, f"data.data_files={corpus}", *NODES], run, [cache, cache]))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    assert samples_per_step(run) == samples_per_step(one_node)
    assert_same_curves(one_node, run)
    report("2 torchrun nodes vs 1 node x 2 processes", one_node, run)
    report("2 torchrun nodes vs 1 node x 2 processes", one_node, run, "val/loss")
    assert metrics(run)["tokens_seen"] == metrics(one_node)["tokens_seen"]
    # The run's files come from global rank 0 only; node 1 logs to a file of its own.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (one_node / "checkpoints").iterdir()
    )
    log0, log1 = (run / "train.log").read_text(), (run / "train_rank1.log").read_text()
    assert "GLOBAL_RANK: 0" in log0 and "GLOBAL_RANK: 1" not in log0 and "GLOBAL_RANK: 1" in log1
    # One cache on a disk both nodes share: the tokenizer and the tokenized corpus are built once
    # (by whichever node's local rank 0 comes first), the other node waits and loads them.
    both = "".join(outs)
    assert both.count("training a char tokenizer") == 1, both[-3000:]
    assert both.count("tokenized corpus cached at") == 1 and both.count("tokenized corpus found in cache") == 1
    assert len(entries(cache / "tokens")) == 1


def test_two_torchrun_nodes_killed_and_relaunched_resume_exactly(corpus: Path, one_node: Path, tmp_path: Path) -> None:
    """Both nodes SIGKILLed after a checkpoint, relaunched with ckpt_path=last: the per-step losses
    equal the uninterrupted 2-process run's. Each node has a cache of its own (node-local disks):
    each builds it once, on the first launch."""
    run, caches = tmp_path / "two_nodes", [tmp_path / "cache0", tmp_path / "cache1"]
    args = [*ARGS, f"data.data_files={corpus}", *NODES, "callbacks.model_checkpoint.every_n_train_steps=4"]
    procs = start_nodes(args, run, caches)
    ckpt = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.is_file():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the end"
        time.sleep(0.05)
    kill(procs)
    from tests.training.test_resume import saved_step

    killed_at = saved_step(ckpt)
    assert killed_at < STEPS
    outs = finish(start_nodes([*args, "ckpt_path=last"], run, caches))
    assert all("tokenized corpus found in cache" in out for out in outs)
    for cache in caches:
        assert len(entries(cache / "tokens")) == 1
    # val/loss of the checkpoint's step may have died with the killed run (it is computed after the save),
    # and so may that step's train/loss row: Lightning logs a step after on_train_batch_end, where the
    # checkpoint is written, so a SIGKILL in between loses that one row (as in test_resume's chain).
    want, got = metrics(one_node)["train/loss"], metrics(run)["train/loss"]
    assert set(got) <= set(want) and set(want) - set(got) <= {killed_at}, sorted(set(want) ^ set(got))
    assert max(abs(got[s] - want[s]) for s in got) <= TOL
    report(f"2 torchrun nodes killed at step {killed_at} and resumed vs uninterrupted", one_node, run)
    assert abs(metrics(run)["val/loss"][STEPS] - metrics(one_node)["val/loss"][STEPS]) <= 1e-5
    assert samples_per_step(run) == samples_per_step(one_node)


def test_a_node_that_cannot_see_the_checkpoint_is_refused(corpus: Path, tmp_path: Path) -> None:
    """Nodes without a shared run directory: node 1 finds no checkpoint where node 0 resumes. The job
    stops with one line instead of training node 1 from step 0 beside a resumed node 0."""
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    args = [*ARGS, f"data.data_files={corpus}", *NODES, "trainer.max_steps=2"]
    shared.mkdir()
    finish(start_nodes(args, shared / "run", [cache, cache]))
    port = free_port()
    procs = []
    for rank, run in enumerate([shared / "run", tmp_path / "node1_disk" / "run"]):
        run.parent.mkdir(exist_ok=True)
        env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        cmd += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        cmd += [TRAIN, *args, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={run}"]
        procs.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1: none" in errors[0] and "share" in errors[0], results[0][1][-3000:]
    assert trace(shared / "run")[0][-1]["step"] == 1  # node 0 trained no step beyond its checkpoint


def test_a_streamed_corpus_is_read_once_across_two_torchrun_nodes(corpus: Path, tmp_path: Path) -> None:
    """data.streaming on 2 nodes: each rank trains on the blocks packed from its own documents —
    every 2nd training document, counted over the whole job — in stream order; no block twice,
    none on both ranks. The reference packs the documents by hand (block + 1 tokens, stride block)."""
    import hashlib

    import datasets
    import numpy as np
    from tokenizers import Tokenizer

    from lm_lab.data.tokenizer import eot_id

    run, cache = tmp_path / "stream", tmp_path / "cache"
    stream = ["data.path=text", "data.sample_by=paragraph", "data.streaming=true", "data.streaming_val_docs=20"]
    args = [*ARGS, f"data.data_files={corpus}", *stream, *NODES, "trainer.max_steps=6"]
    finish(start_nodes(args, run, [cache, cache]))

    tok = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    docs = [r["text"] for r in datasets.load_dataset("text", data_files=str(corpus), sample_by="paragraph")["train"]]
    train_docs = docs[20:]  # the first data.streaming_val_docs documents are the validation split
    trained = trace(run)
    assert sorted(trained) == [0, 1]
    seen: list[str] = []
    for rank in (0, 1):
        ids: list[int] = []
        for text in train_docs[rank::2]:
            ids += tok.encode(text, add_special_tokens=False).ids + [eot_id(tok)]
        blocks = [
            hashlib.blake2b(np.asarray(ids[i : i + 64], dtype=np.int64).tobytes(), digest_size=8).hexdigest()
            for i in range(0, len(ids) - 64, 64)
        ]
        got = [i for r in trained[rank] if r["epoch"] == 0 for i in r["ids"]]
        assert len(got) == 6 * 8 and got == blocks[: len(got)], f"rank {rank}"
        seen += got
    assert len(seen) == len(set(seen))
