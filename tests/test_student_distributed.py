"""The student pass on several processes: torchrun with 2 CPU processes over gloo against one process.

Every process is pinned to one thread (``OMP_NUM_THREADS=1``, which torch reads at start), so
that the only differences between the runs are the ones the split itself makes: the order in
which floating-point sums are taken.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from pipeline.cache import open_cache, shuffled_seq_indices
from pipeline.distributed import World
from pipeline.student_distributed import RankOrder, ShuffledOrder, _buckets, rank_order

ROOT = Path(__file__).resolve().parents[1]
# Tolerances for 1 process x batch 2B against 2 processes x batch B: the same rows and the same
# mean gradient, summed in another order (measured: losses within 4e-8 relative, weights within 3.1e-7).
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 5e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def student_train(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline student-train ARGS`` in one process, or under torchrun with ``processes``."""
    if processes == 1:
        launcher = [sys.executable, "-m", "pipeline"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(free_port()), "-m", "pipeline"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(
        [*launcher, "student-train", *args], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env
    )


def train_args(cache: Path, student: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "--cache",
        str(cache),
        "--student",
        str(student),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "2",
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        *extra,
    ]


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(records: list[dict], reference: list[dict], rtol: float = LOSS_RTOL) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for record, expected in zip(records, reference, strict=True):
        for name in ("loss", "kd", "ce", "top1_agreement", "kl_t1", "student_entropy", "lr", "epoch"):
            assert record[name] == pytest.approx(expected[name], rel=rtol, abs=1e-7), (name, record["step"])


def assert_same_weights(folder: Path, reference: Path, atol: float = WEIGHT_ATOL, mean_atol: float = 1.0) -> None:
    """The same tensor names, each tensor within ``atol`` everywhere and ``mean_atol`` on average."""
    weights, expected = load_file(str(folder / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = (weights[name] - tensor).abs()
        assert difference.max().item() <= atol and difference.mean().item() <= mean_atol, (name, difference.max())


def in_process(*args: str):
    """``distill student-train ARGS`` in this process, on one thread as each torchrun process is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli("student-train", *args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(train_cache: Path, student_config_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process at batch 4 and two processes at batch 2, both 2 micro-batches a step, 6 steps."""
    root = tmp_path_factory.mktemp("distributed")
    single, double = root / "single", root / "double"
    result = in_process(*train_args(train_cache, student_config_dir, single, 4))
    assert result.exit_code == 0, result.output
    result = succeeded(student_train(2, *train_args(train_cache, student_config_dir, double, 2)))
    assert result.stdout.count("student ") == 1, result.stdout  # rank 0 reports for both
    return {"single": single, "double": double, "root": root}


def test_two_processes_at_batch_b_follow_one_process_at_batch_2b(runs):
    single, double = runs["single"], runs["double"]
    assert_same_curve(metrics(double), metrics(single))
    assert_same_weights(double, single)
    assert_same_weights(double / "checkpoints" / "step-0000003", single / "checkpoints" / "step-0000003")
    training = json.loads((double / "training.json").read_text())
    assert (training["world_size"], training["effective_batch"]) == (2, 8)
    assert training["tokens"] == json.loads((single / "training.json").read_text())["tokens"]
    assert {record["effective_batch"] for record in metrics(double)} == {8}
    state = json.loads((double / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert (state["world_size"], state["rows_seen"]) == (2, 24)


def resumable_copy(folder: Path, dest: Path) -> Path:
    """``folder`` as it stood at its step-3 checkpoint: the final model and later metrics gone."""
    shutil.copytree(folder, dest)
    for name in json.loads((dest / "outputs.json").read_text())["files"] + ["training.json"]:
        (dest / name).unlink()
    lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dest / "metrics.jsonl").write_text("".join(lines[:3]))
    return dest


def untimed(records: list[dict]) -> list[dict]:
    return [{name: value for name, value in record.items() if name != "tokens_per_s"} for record in records]


@pytest.mark.slow
def test_a_run_resumed_under_torchrun_ends_where_the_uninterrupted_one_did(runs, train_cache, student_config_dir):
    out = resumable_copy(runs["double"], runs["root"] / "resumed")
    succeeded(student_train(2, *train_args(train_cache, student_config_dir, out, 2, "--resume")))
    # The same processes, rows and state as the uninterrupted run: the same bits.
    assert untimed(metrics(out)) == untimed(metrics(runs["double"]))
    assert_same_weights(out, runs["double"])


def test_a_resume_on_another_world_size_with_the_same_global_batch_continues_the_run(
    runs, train_cache, student_config_dir
):
    out = resumable_copy(runs["double"], runs["root"] / "resumed-single")
    result = in_process(*train_args(train_cache, student_config_dir, out, 4, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_curve(metrics(out), metrics(runs["double"]))
    assert_same_weights(out, runs["double"])
    training = json.loads((out / "training.json").read_text())
    assert (training["world_size"], training["effective_batch"]) == (1, 8)


def test_a_resume_that_would_change_the_data_order_is_refused_naming_both_sizes(runs, train_cache, student_config_dir):
    out = resumable_copy(runs["double"], runs["root"] / "refused")
    result = in_process(*train_args(train_cache, student_config_dir, out, 2, "--resume"))
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --resume: the checkpoint was trained on 2 process(es) x --batch-size 2"), line
    assert "this launch has 1 x --batch-size 2" in line and "or --batch-size 4 on 1" in line
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_per_process_and_a_failed_launch(runs, train_cache, student_config_dir):
    out = resumable_copy(runs["double"], runs["root"] / "refused-torchrun")
    result = student_train(2, *train_args(train_cache, student_config_dir, out, 4, "--resume"))
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert errors == {"error: --resume: --batch-size was 2, now 4; resume with the run's settings or start a new --out"}
    # torchrun adds its own report of the failed worker; the workers themselves print no traceback.
    assert f'File "{ROOT / "pipeline"}' not in result.stderr, result.stderr[-3000:]


TIED = ("--student-config", "tie_word_embeddings=true")
TIED_TOLERANCE = {"atol": 5e-4, "mean_atol": 5e-6}


@pytest.fixture(scope="module")
def fsdp_runs(runs, train_cache: Path, heldout_cache: Path, student_config_dir: Path) -> dict[str, Path]:
    """A student with a tied LM head, trained and evaluated by one process and by two under --fsdp."""
    single, sharded = runs["root"] / "tied-single", runs["root"] / "tied-fsdp"
    evaluation = ("--eval-cache", str(heldout_cache))
    result = in_process(*train_args(train_cache, student_config_dir, single, 4, *TIED, *evaluation))
    assert result.exit_code == 0, result.output
    succeeded(student_train(2, *train_args(train_cache, student_config_dir, sharded, 2, *TIED, *evaluation, "--fsdp")))
    return {"single": single, "fsdp": sharded}


def test_two_fsdp_processes_train_a_tied_student_as_one_process_does(fsdp_runs):
    single, sharded = fsdp_runs["single"], fsdp_runs["fsdp"]
    # Adam turns rounding into whole steps where a gradient is near 0: with the head tied, one embedding
    # row of this student moves apart (1.1e-4, as it does without --fsdp) and the rest follow it a little
    # (measured: at most 7.1e-7 on average per tensor; the loss within 4e-7 relative).
    assert_same_curve(metrics(sharded), metrics(single), rtol=2e-6)
    assert_same_weights(sharded, single, **TIED_TOLERANCE)
    checkpoint = Path("checkpoints") / "step-0000003"
    assert_same_weights(sharded / checkpoint, single / checkpoint, **TIED_TOLERANCE)
    for name in ("kl", "ce"):
        expected = json.loads((single / "eval.json").read_text())[name]
        assert json.loads((sharded / "eval.json").read_text())[name] == pytest.approx(expected, rel=1e-5)
    training = json.loads((sharded / "training.json").read_text())
    assert training["config"]["fsdp"] is True and training["world_size"] == 2
    config = json.loads((sharded / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert set(load_file(str(sharded / "model.safetensors"))) == set(load_file(str(single / "model.safetensors")))


def test_an_fsdp_checkpoint_resumes_in_one_process(fsdp_runs, train_cache, heldout_cache, student_config_dir):
    out = resumable_copy(fsdp_runs["fsdp"], fsdp_runs["fsdp"].parent / "tied-fsdp-resumed-single")
    (out / "eval.json").unlink()
    result = in_process(*train_args(train_cache, student_config_dir, out, 4, *TIED, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_curve(metrics(out), metrics(fsdp_runs["fsdp"]), rtol=2e-6)
    assert_same_weights(out, fsdp_runs["fsdp"], **TIED_TOLERANCE)


@pytest.mark.slow
def test_an_fsdp_run_resumed_under_torchrun_ends_where_the_uninterrupted_one_did(
    fsdp_runs, train_cache, heldout_cache, student_config_dir
):
    out = resumable_copy(fsdp_runs["fsdp"], fsdp_runs["fsdp"].parent / "tied-fsdp-resumed")
    args = train_args(train_cache, student_config_dir, out, 2, *TIED, "--eval-cache", str(heldout_cache), "--fsdp")
    succeeded(student_train(2, *args, "--resume"))
    assert untimed(metrics(out)) == untimed(metrics(fsdp_runs["fsdp"]))
    assert_same_weights(out, fsdp_runs["fsdp"])


def test_fsdp_in_a_single_process_is_refused_in_one_line(train_cache, student_config_dir, tmp_path):
    result = in_process(*train_args(train_cache, student_config_dir, tmp_path / "out", 4, "--fsdp"))
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --fsdp shards the student across torchrun's processes") and "drop --fsdp" in line
    assert not (tmp_path / "out").exists()


def test_each_rank_reads_its_share_of_every_global_micro_batch_of_the_single_process_order(train_cache):
    cache = open_cache(train_cache)
    manifest = cache.manifest
    single = list(zip(range(3 * manifest.sequences), ShuffledOrder(manifest, 5).rows(0)))
    first_epoch = [index for _, index in single[: manifest.sequences]]
    assert sorted(first_epoch) == list(range(manifest.sequences))
    # The order is the one the single-process path reads (Cache.shuffled_rows), row for row.
    rows = list(cache.shuffled_rows(5, 0))
    assert [row.input_ids.tolist() for row in rows] == [row.input_ids.tolist() for row in cache.rows_at(first_epoch)]
    assert list(shuffled_seq_indices(manifest, 5, 0, start=7)) == first_epoch[7:]
    for start in (0, 12):
        shares = [
            list(zip(range(30), RankOrder(ShuffledOrder(manifest, 5), 3, World(r, 2, r)).rows(start))) for r in (0, 1)
        ]
        merged = []
        for micro in range(5):
            for share in shares:
                merged += [index for _, index in share[3 * micro : 3 * micro + 3]]
        assert merged == [index for _, index in single[start : start + 30]]
    assert rank_order(None, manifest, 5, 3, World()) is None


def test_gradient_buckets_keep_devices_and_dtypes_apart_and_respect_the_byte_cap():
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(3, dtype=torch.float64), torch.zeros(100)]
    buckets = list(_buckets(grads, bucket_bytes=80))
    assert [[tuple(g.shape) for g in bucket] for bucket in buckets] == [[(10,), (10,)], [(3,)], [(100,)]]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_student_train_runs_under_torchrun_when_nproc_is_above_one():
    import shlex

    from helpers import make_dry_run

    left_out = {"NPROC", "CACHE", "OUT", "STUDENT", "STUDENT_ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    _, output = make_dry_run("student-train", {"NPROC": "2", "CACHE": "caches/a"}, left_out)
    (line,) = [line for line in output.replace("\\\n", " ").splitlines() if "student-train" in line]
    words = shlex.split(line)
    assert words[0] == ".venv/bin/torchrun", output
    assert words[1:6] == ["--nproc-per-node", "2", "-m", "pipeline", "student-train"], output
    assert words[words.index("--cache") + 1] == "caches/a" and words[words.index("--batch-size") + 1] == "4"
    for nproc in ("1", None):
        settings = {"CACHE": "caches/a", **({"NPROC": nproc} if nproc else {})}
        (plain,), output = make_dry_run("student-train", settings, left_out)
        assert plain[0] == "student-train" and "torchrun" not in output


@pytest.mark.parametrize(
    ("device", "fsdp", "size", "message"),
    [
        ("cuda:1", False, 2, "--device cuda:1 would put all 2 processes on one GPU"),
        ("mps", False, 2, "--device mps runs in one process, but torchrun started 2"),
        ("cpu", True, 1, "--fsdp shards the student across torchrun's processes"),
    ],
)
def test_settings_a_launch_cannot_run_are_refused_naming_the_flag(device, fsdp, size, message):
    from pipeline.config import StudentTrainConfig
    from pipeline.errors import ConfigError
    from pipeline.student_setup import check_world

    cfg = StudentTrainConfig(cache="c", student="s", out="o", device=device, fsdp=fsdp)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_world(cfg, World(0, size, 0))
    check_world(StudentTrainConfig(cache="c", student="s", out="o", device="cuda"), World(1, size, 1))


def test_a_damaged_world_size_in_a_checkpoint_is_refused_in_one_line(runs, train_cache, student_config_dir):
    out = resumable_copy(runs["double"], runs["root"] / "damaged-world-size")
    state_path = out / "checkpoints" / "step-0000003" / "state.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "world_size": "two"}))
    result = in_process(*train_args(train_cache, student_config_dir, out, 2, "--resume"))
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "field 'world_size' is not a positive integer" in line and "start afresh with --overwrite" in line
