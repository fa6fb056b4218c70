"""Curriculum by teacher confidence: the per-row statistics the teacher pass stores, the order built from
them, and ``--curriculum confidence`` through the command line (pacing, resume, old caches)."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cache, run_cli
from safetensors.torch import load_file

import pipeline
from pipeline.curriculum import CurriculumOrder, Pacing, confidence_ranking
from pipeline.errors import CacheError
from pipeline.row_stats import decode_cells, encode_cell, position_stats

V1_CACHE = Path(__file__).parent / "data" / "v1-cache"


# --- pure parts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "root"])
def test_pacing_starts_at_its_start_grows_and_reaches_every_row_at_its_span(kind):
    pacing = Pacing(kind, start=0.2, steps=10)
    values = [pacing.competence(step) for step in range(15)]
    assert values[0] == pytest.approx(0.2)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[9] < 1.0 and values[10:] == [1.0] * 5


def test_root_pacing_opens_the_pool_faster_than_linear():
    root, linear = Pacing("root", 0.1, 100), Pacing("linear", 0.1, 100)
    assert all(root.competence(step) >= linear.competence(step) for step in range(101))
    assert root.competence(10) > linear.competence(10) + 0.1


def test_ranking_puts_high_top1_first_then_low_entropy_and_breaks_ties_by_seed():
    stats = np.array([[0.2, 3.0], [0.9, 1.0], [0.5, 2.0], [0.9, 0.5], [0.5, 2.0], [0.5, 2.0]], dtype=np.float32)
    ranking = confidence_ranking(stats, seed=0)
    assert ranking[:3].tolist() == [3, 1, ranking[2]] and ranking[-1] == 0
    assert sorted(ranking[2:5].tolist()) == [2, 4, 5]
    orders = {tuple(confidence_ranking(stats, seed)[2:5]) for seed in range(20)}
    assert len(orders) > 1  # the three equal rows are ordered by the seed


def make_order(rows=100, batch=4, accum=2, seed=0, start=0.2, steps=10):
    ranking = np.random.default_rng(5).permutation(rows)
    return CurriculumOrder(ranking, Pacing("linear", start, steps), seed, batch, accum)


def test_each_micro_batch_draws_from_the_most_confident_pool_of_its_step():
    order = make_order()
    for number in range(40):
        step = number // 2
        pool = set(order.ranking[: order.pool_size(step)].tolist())
        rows = order.micro_batch(number)
        assert len(set(rows.tolist())) == 4 and set(rows.tolist()) <= pool
    assert order.pool_size(0) == 20 and order.pool_size(10) == 100


def test_the_order_is_a_function_of_the_seed_and_resumes_mid_run():
    from itertools import islice

    order = make_order()
    whole = list(islice(order.rows(0), 200))
    assert list(islice(order.rows(96), 104)) == whole[96:]
    assert whole != list(islice(make_order(seed=1).rows(0), 200))


def test_a_pool_smaller_than_a_batch_still_fills_the_batch():
    order = make_order(rows=3, batch=8, start=0.1)
    assert len(order.micro_batch(0)) == 8 and set(order.micro_batch(0).tolist()) <= set(order.ranking.tolist())


def test_position_stats_are_the_top1_probability_and_entropy_of_the_softmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 4
    top1, entropy = position_stats(logits)
    probs = torch.softmax(logits.double(), dim=-1)
    assert torch.allclose(top1.double(), probs.max(-1).values, atol=1e-6)
    assert torch.allclose(entropy.double(), -(probs * probs.log()).sum(-1), atol=1e-5)
    peaked = torch.full((1, 50), -1e4)
    peaked[0, 3] = 0.0
    top1, entropy = position_stats(peaked)
    assert top1.item() == pytest.approx(1.0) and entropy.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "cell",
    [b"\x00" * 7, encode_cell(1.5, 1.0), encode_cell(0.5, -1.0), encode_cell(0.5, 9.0), encode_cell(0.5, float("nan"))],
)
def test_damaged_row_stats_cells_are_refused(cell):
    with pytest.raises(CacheError, match="row_stats"):
        decode_cells([encode_cell(0.5, 1.0), cell], logit_width=320, where="shard 'x'")  # log 320 = 5.77


# --- what the teacher pass stores -------------------------------------------------------------------------


def test_the_teacher_pass_stores_each_rows_confidence_and_each_shards_summary(train_cache, teacher_dir):
    from transformers import AutoModelForCausalLM

    cache = pipeline.open_cache(train_cache)
    assert cache.manifest.has_row_stats
    stats = cache.row_stats()
    assert stats.shape == (len(cache), 2)
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    rows = list(cache)
    with torch.no_grad():
        for index in (0, 7, len(rows) - 1):
            logits = model(torch.from_numpy(rows[index].input_ids)[None]).logits[0]
            top1, entropy = position_stats(logits)
            assert stats[index] == pytest.approx([top1.mean().item(), entropy.mean().item()], abs=1e-4)
    for entry in cache.manifest.shards:
        own = stats[entry.first_seq : entry.first_seq + entry.rows].astype(np.float64).mean(axis=0)
        assert [entry.row_stats["mean_top1_prob"], entry.row_stats["mean_entropy"]] == pytest.approx(own, abs=1e-5)
    assert len(set(stats[:, 0].round(4).tolist())) > len(stats) // 2  # rows differ: something to order by


def test_random_access_reads_the_same_rows_as_a_pass_in_order(train_cache):
    cache = pipeline.open_cache(train_cache)
    in_order = list(cache)
    wanted = [5, 0, len(cache) - 1, 5, 17, 3]
    for index, row in zip(wanted, cache.rows_at(wanted), strict=True):
        assert np.array_equal(row.input_ids, in_order[index].input_ids)
        assert np.array_equal(row.ids, in_order[index].ids)
        assert np.array_equal(row.logprobs, in_order[index].logprobs)
    with pytest.raises(IndexError):
        list(cache.rows_at([len(cache)]))


def test_random_access_checks_each_shards_hash(train_cache, tmp_path):
    copy = shutil.copytree(train_cache, tmp_path / "cache")
    shard = copy / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = pipeline.open_cache(copy)
    first = cache.manifest.shards[1].first_seq
    with pytest.raises(CacheError, match=r"shard-00001\.arrow' fails its checksum"):
        list(cache.rows_at([0, first]))


def test_recode_carries_the_row_statistics(train_cache, tmp_path):
    result = run_cli("recode", "--cache", str(train_cache), "--out", str(tmp_path / "recoded"), "--top-k", "4")
    assert result.exit_code == 0, result.output
    source, recoded = pipeline.open_cache(train_cache), pipeline.open_cache(tmp_path / "recoded")
    assert recoded.manifest.has_row_stats
    assert np.array_equal(recoded.row_stats(), source.row_stats())
    assert [entry.row_stats for entry in recoded.manifest.shards] == [
        entry.row_stats for entry in source.manifest.shards
    ]


def test_an_old_cache_has_no_statistics_and_says_so(tmp_path):
    cache = pipeline.open_cache(V1_CACHE)
    assert not cache.manifest.has_row_stats
    with pytest.raises(CacheError, match="holds no per-row teacher statistics"):
        cache.row_stats()


# --- through the command line -----------------------------------------------------------------------------


def train(cache, student, out, *extra):
    common = ["--batch-size", "2", "--max-steps", "6", "--log-every", "1", "--seed", "0", "--lr", "3e-3"]
    return run_cli(
        "student-train", "--cache", str(cache), "--student", str(student), "--out", str(out), *common, *extra
    )


CURRICULUM = ("--curriculum", "confidence", "--curriculum-start", "0.1", "--curriculum-span", "0.5")


def test_curriculum_trains_from_confident_rows_and_records_the_pool(train_cache, student_config_dir, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    result = train(train_cache, student_config_dir, tmp_path / "run", *CURRICULUM, "--curriculum-pacing", "linear")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pools = [record["curriculum_pool"] for record in records]
    assert pools[0] < 0.2 and pools == sorted(pools) and pools[-1] == 1.0
    assert "curriculum:" in caplog.text and "linear pacing" in caplog.text
    config = json.loads((tmp_path / "run" / "training.json").read_text())["config"]
    assert config["curriculum"] == "confidence" and config["curriculum_start"] == 0.1


def test_the_first_batches_hold_the_rows_the_teacher_is_most_confident_on(train_cache, student_config_dir, tmp_path):
    from pipeline.config import StudentTrainConfig
    from pipeline.student_setup import prepare_run

    cfg = StudentTrainConfig(
        cache=str(train_cache),
        student=str(student_config_dir),
        out=str(tmp_path / "out"),
        batch_size=4,
        max_steps=20,
        curriculum="confidence",
        curriculum_start=0.1,
    )
    run = prepare_run(cfg)
    cache = pipeline.open_cache(train_cache)
    stats = cache.row_stats()
    row_of = {row.input_ids.tobytes(): index for index, row in enumerate(cache)}
    cutoff = np.sort(stats[:, 0])[::-1][run.order.pool_size(0) - 1]
    batches = run.teacher.batches(cfg.seed, 0, cfg.batch_size, run.device, run.order)
    first = [row_of[row.numpy().tobytes()] for row in next(batches)["input_ids"]]
    assert all(stats[index, 0] >= cutoff for index in first)
    assert stats[first, 0].mean() > stats[:, 0].mean()


def test_a_resumed_curriculum_run_ends_where_the_uninterrupted_one_does(train_cache, student_config_dir, tmp_path):
    whole = tmp_path / "whole"
    assert train(train_cache, student_config_dir, whole, *CURRICULUM, "--save-every", "3").exit_code == 0
    crashed = shutil.copytree(whole, tmp_path / "crashed")
    (crashed / "model.safetensors").unlink()
    (crashed / "training.json").unlink()
    resumed = train(train_cache, student_config_dir, crashed, *CURRICULUM, "--save-every", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_an_old_cache_trains_but_refuses_a_curriculum_in_one_line(student_config_dir, tmp_path):
    plain = train(V1_CACHE, student_config_dir, tmp_path / "plain", "--max-steps", "2")
    assert plain.exit_code == 0, plain.output
    refused = train(V1_CACHE, student_config_dir, tmp_path / "refused", *CURRICULUM)
    assert refused.exit_code != 0
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--curriculum confidence needs the teacher's per-row statistics" in lines[0]
    assert "make the cache again" in lines[0] and not (tmp_path / "refused").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--curriculum-start", "0.5"), "--curriculum-start shapes a curriculum; add --curriculum confidence"),
        (("--curriculum", "confidence", "--curriculum-span", "0"), "--curriculum-span 0.0 must lie in (0, 1]"),
        (("--curriculum", "confidence", "--curriculum-start", "1.5"), "--curriculum-start 1.5 must lie in (0, 1]"),
    ],
)
def test_bad_curriculum_settings_are_refused_naming_the_flag(
    options, message, train_cache, student_config_dir, tmp_path
):
    result = train(train_cache, student_config_dir, tmp_path / "out", *options)
    assert result.exit_code != 0 and message in result.output, result.output


def test_a_curriculum_over_an_ensemble_ranks_by_the_teachers_mean(
    train_cache, teacher_dir, corpus, student_config_dir, tmp_path
):
    twin = make_cache(
        teacher_dir, corpus["train"], tmp_path / "twin", "--seq-len", "32", "--top-k", "8", "--shard-tokens", "512"
    )
    extra = ("--cache", str(twin), "--ensemble", "mean_prob", *CURRICULUM)
    result = train(train_cache, student_config_dir, tmp_path / "run", *extra)
    assert result.exit_code == 0, result.output


def test_deep_verify_compares_each_shards_row_stats_with_its_manifest_summary(train_cache, tmp_path):
    from pipeline.manifest import CHECKSUM_FIELD, render_manifest
    from pipeline.report import verify_report

    copy = shutil.copytree(train_cache, tmp_path / "cache")
    assert verify_report(copy, deep=True)[0] == []
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest[CHECKSUM_FIELD]
    manifest["shards"][1]["row_stats"]["mean_top1_prob"] += 0.01
    (copy / "manifest.json").write_bytes(render_manifest(manifest))
    problems, _ = verify_report(copy, deep=True)
    assert len(problems) == 1 and "shard-00001.arrow': its row_stats column averages" in problems[0]


@pytest.mark.parametrize(
    "spec",
    [
        {"strategy": "topk", "k": 8},
        {"strategy": "topp", "k": None, "top_p": 0.9, "min_k": 1, "max_k": 16},
        {"strategy": "sample", "k": None, "samples": 8, "sample_temperature": 1.0, "sample_logprobs": True, "seed": 1},
        {"strategy": "hybrid", "k": 4, "samples": 8, "sample_temperature": 1.0, "seed": 1},
    ],
    ids=lambda spec: spec["strategy"],
)
def test_captures_measure_the_same_statistics_on_the_way(spec):
    from pipeline.capture import capture
    from pipeline.capture_spec import CaptureSpec

    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(2)) * 3
    expected = position_stats(logits)
    captured = capture(logits.clone(), CaptureSpec(**spec), torch.arange(12), overwrite=True, measure=True)
    assert torch.allclose(captured.top1_prob, expected[0], atol=1e-6)
    assert torch.allclose(captured.entropy, expected[1], atol=1e-5)


def test_a_cache_made_without_row_statistics_has_none_and_refuses_a_curriculum(
    teacher_dir, corpus, student_config_dir, tmp_path
):
    options = ("--seq-len", "16", "--top-k", "4", "--max-tokens", "128", "--no-row-stats")
    cache = make_cache(teacher_dir, corpus["heldout"], tmp_path / "plain", *options)
    manifest = pipeline.open_cache(cache).manifest
    assert not manifest.has_row_stats and "row_stats" not in [column.name for column in manifest.columns]
    assert all(entry.row_stats is None for entry in manifest.shards)
    refused = train(cache, student_config_dir, tmp_path / "refused", *CURRICULUM)
    assert refused.exit_code != 0 and "lacks" in refused.output
