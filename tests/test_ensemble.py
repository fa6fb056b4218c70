"""Teacher ensembles: the combined target equals the dense ensemble of the teachers the caches describe."""

import math

import pytest
import torch

from pipeline.ensemble import combine_targets, union_ids
from pipeline.losses import bucket_target, sampled_target

VOCAB, K, N = 30, 6, 7


def teacher_with_even_tail(seed: int, k: int = K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense teacher ``(N, V)`` whose mass outside its top ``k`` is spread evenly (what a cache lets an
    ensemble assume), its top-k ids and log-probabilities, and its tail log-mass."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, VOCAB, generator=generator) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    tail = torch.log1p(-top_logprobs.exp().sum(-1).clamp_max(1 - 1e-6))
    even = torch.full((N, VOCAB), 0.0).scatter(-1, top_ids, 1.0) == 0
    dense = torch.where(even, (tail - math.log(VOCAB - k)).unsqueeze(-1), logprobs)
    return dense, top_ids, top_logprobs, tail


def folded(dense_logprobs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A dense distribution folded onto ``ids`` and one rest bucket: ``(N, M + 1)`` probabilities."""
    probs = dense_logprobs.exp()
    at_ids = torch.where(valid, probs.gather(-1, ids), 0.0)
    return torch.cat([at_ids, (1 - at_ids.sum(-1)).unsqueeze(-1)], dim=-1)


def targets_and_dense(seeds=(1, 2), temperature=1.0):
    targets, tails, denses = [], [], []
    for seed in seeds:
        dense, ids, logprobs, tail = teacher_with_even_tail(seed)
        targets.append(bucket_target(ids, None, logprobs, tail, temperature, vocab_size=VOCAB))
        tails.append(torch.full((N,), VOCAB - K))
        denses.append(torch.log_softmax(dense / temperature, dim=-1))
    return targets, tails, denses


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, 0.3), (1.0, 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_prob_equals_the_dense_mean_of_the_teachers_folded_onto_the_union(weights, temperature):
    targets, tails, denses = targets_and_dense(temperature=temperature)
    combined = combine_targets(targets, tails, weights, "mean_prob", VOCAB)
    dense = torch.logsumexp(torch.stack([d + math.log(w) for d, w in zip(denses, weights) if w > 0]), dim=0)
    valid = combined.logprobs > float("-inf")
    expected = folded(dense, combined.ids, valid)
    assert torch.allclose(combined.buckets().exp(), expected, atol=1e-5)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2)])
def test_mean_logprob_equals_the_normalised_dense_geometric_mean(weights):
    targets, tails, denses = targets_and_dense(seeds=(3, 4, 5), temperature=1.0)
    weights = (*weights, 0.5)
    combined = combine_targets(targets, tails, weights, "mean_logprob", VOCAB)
    total = sum(weights)
    dense = torch.log_softmax(sum(d * (w / total) for d, w in zip(denses, weights)), dim=-1)
    valid = combined.logprobs > float("-inf")
    assert torch.allclose(combined.buckets().exp(), folded(dense, combined.ids, valid), atol=1e-5)


def test_identical_teachers_give_the_teacher_back():
    targets, tails, _ = targets_and_dense(seeds=(6, 6))
    for mode in ("mean_prob", "mean_logprob"):
        combined = combine_targets(targets, tails, (0.3, 0.7), mode, VOCAB)
        valid = combined.logprobs > float("-inf")
        assert int(valid.sum(-1).max()) == K  # the union of one id set twice is that set
        order = torch.argsort(targets[0].ids, dim=-1)
        assert torch.equal(combined.ids[:, :K], targets[0].ids.gather(-1, order))
        assert torch.allclose(combined.logprobs[:, :K], targets[0].logprobs.gather(-1, order), atol=1e-5)
        assert torch.allclose(combined.rest_logprob, targets[0].rest_logprob, atol=1e-5)


def test_union_ids_are_distinct_sorted_and_padded_with_the_first_id():
    ids_a = torch.tensor([[5, 3, 9], [1, 1, 1]])
    valid_a = torch.tensor([[True, True, True], [True, False, False]])
    ids_b = torch.tensor([[3, 7], [2, 1]])
    valid_b = torch.tensor([[True, True], [True, True]])
    ids, valid = union_ids([ids_a, ids_b], [valid_a, valid_b])
    assert ids.tolist() == [[3, 5, 7, 9, 3], [1, 2, 1, 1, 1]]
    assert valid.tolist() == [[True, True, True, True, False], [True, True, False, False, False]]


def test_a_sampled_teacher_adds_no_share_outside_its_draws_under_mean_prob():
    _, ids, logprobs, tail = teacher_with_even_tail(7)
    top = bucket_target(ids, None, logprobs, tail, vocab_size=VOCAB)
    counts = torch.zeros(N, 3, dtype=torch.int32)
    counts[:, 0], counts[:, 1] = 3, 1
    drawn = torch.stack([ids[:, 0], torch.full((N,), 29), torch.full((N,), 29)], dim=-1)
    valid = torch.tensor([True, True, False]).expand(N, 3)
    sampled = sampled_target(drawn, valid, counts, None, 1.0, 1.0)
    combined = combine_targets(
        [top, sampled], [torch.full((N,), VOCAB - K), torch.full((N,), VOCAB - 2)], (0.5, 0.5), "mean_prob", VOCAB
    )
    probs = combined.buckets().exp()
    assert torch.allclose(probs.sum(-1), torch.ones(N), atol=1e-5)
    assert combined.estimator == "sampled"
    # The rest is the top-k teacher's rest alone (halved), less the share of id 29 when it took one.
    in_top = (ids == 29).any(-1)
    expected_rest = 0.5 * tail.exp() * torch.where(in_top, 1.0, (VOCAB - K - 1) / (VOCAB - K))
    assert torch.allclose(probs[:, -1], expected_rest, atol=1e-5)


# --- Through the command line: two teachers of one token stream -------------------------------------


@pytest.fixture(scope="module")
def second_teacher(workdir, tokenizer_dir):
    """Another teacher of the same tokenizer, with a narrower LM head (fewer padded logits)."""
    import shutil

    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(304, 48, init=0.2), dtype=torch.float32)
    folder = workdir / "second-teacher"
    model.save_pretrained(str(folder))
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


TRAIN_OPTIONS = ("--seq-len", "32", "--top-k", "16", "--shard-tokens", "512", "--batch-size", "4")


@pytest.fixture(scope="module")
def second_cache(workdir, second_teacher, corpus):
    from conftest import make_cache

    return make_cache(second_teacher, corpus["train"], workdir / "cache-second", *TRAIN_OPTIONS)


@pytest.fixture
def train(student_config_dir):
    """``distill student-train`` of a config-built student on ``caches``: 3 steps, each logged."""
    from conftest import run_cli

    def run(caches, out, *extra):
        args = [arg for cache in caches for arg in ("--cache", str(cache))]
        common = ["--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--seed", "0"]
        return run_cli("student-train", *args, "--student", str(student_config_dir), "--out", str(out), *common, *extra)

    return run


def metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_repeated_cache_without_ensemble_is_refused_in_one_line(train, train_cache, second_cache, tmp_path):
    result = train([train_cache, second_cache], tmp_path / "out")
    assert result.exit_code != 0
    assert "--cache given 2 times without --ensemble" in result.output and "--ensemble mean_prob" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["mean_prob", "mean_logprob"])
def test_an_ensemble_of_two_teachers_trains_and_records_its_settings(train, mode, train_cache, second_cache, tmp_path):
    import json

    out = tmp_path / mode
    result = train([train_cache, second_cache], out, "--ensemble", mode, "--cache-weights", "0.7,0.3")
    assert result.exit_code == 0, result.output
    records = metrics(out)
    assert len(records) == 3 and all(record["kl_t1"] > 0 and math.isfinite(record["loss"]) for record in records)
    config = json.loads((out / "training.json").read_text())["config"]
    assert config["ensemble"] == mode and config["cache_weights"] == [0.7, 0.3]
    assert config["cache"] == str(train_cache) and config["ensemble_caches"] == [str(second_cache)]


def test_an_ensemble_of_one_cache_twice_trains_exactly_as_that_cache(train, train_cache, tmp_path):
    single = train([train_cache], tmp_path / "single", "--temperature", "2")
    twice = train([train_cache, train_cache], tmp_path / "twice", "--ensemble", "mean_logprob", "--temperature", "2")
    assert single.exit_code == 0 and twice.exit_code == 0, single.output + twice.output
    for a, b in zip(metrics(tmp_path / "single"), metrics(tmp_path / "twice"), strict=True):
        for name in ("loss", "kd", "kl_t1", "kl_t", "top1_agreement"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name


def test_an_ensemble_resumes_and_refuses_other_caches_on_resume(train, train_cache, second_cache, tmp_path):
    out = tmp_path / "resume"
    ensemble = ("--ensemble", "mean_prob", "--save-every", "1")
    assert train([train_cache, second_cache], out, *ensemble).exit_code == 0
    again = train([train_cache, second_cache], out, *ensemble, "--max-steps", "4", "--resume")
    assert again.exit_code == 0, again.output
    assert metrics(out)[-1]["step"] == 4
    swapped = train([second_cache, train_cache], out, *ensemble, "--max-steps", "5", "--resume")
    assert swapped.exit_code != 0 and "trained on another cache" in swapped.output


@pytest.mark.parametrize(
    ("options", "corpus_name", "message"),
    [
        (("--seq-len", "16", "--top-k", "16", "--shard-tokens", "512"), "train", "have seq_len 32 and 16"),
        (TRAIN_OPTIONS, "heldout", "hold different token streams"),
        (("--seq-len", "32", "--top-k", "16", "--shard-tokens", "256"), "train", "cut the sequences into shards"),
    ],
)
def test_caches_that_do_not_line_up_are_refused_naming_why(
    train, options, corpus_name, message, train_cache, second_teacher, corpus, tmp_path
):
    from conftest import make_cache

    other = make_cache(second_teacher, corpus[corpus_name], tmp_path / "other", *options)
    result = train([train_cache, other], tmp_path / "out", "--ensemble", "mean_prob")
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_caches_of_another_tokenizer_are_refused(train, train_cache, other_tokenizer_dir, corpus, tmp_path):
    import shutil

    from conftest import make_cache, tiny_llama_config
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(tiny_llama_config(320, 32)).save_pretrained(str(teacher))
    for item in other_tokenizer_dir.iterdir():
        shutil.copy(item, teacher / item.name)
    other = make_cache(teacher, corpus["train"], tmp_path / "other", *TRAIN_OPTIONS)
    result = train([train_cache, other], tmp_path / "out", "--ensemble", "mean_prob")
    assert result.exit_code != 0 and "were made with different tokenizers" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--ensemble", "mean_prob", "--cache-weights", "1,2,3"), "--cache-weights has 3 weights for 2 --cache"),
        (("--ensemble", "mean_prob", "--cache-weights", "1,-1"), "must be non-negative numbers"),
        (("--ensemble", "mean_prob", "--cache-weights", "a,b"), "not a comma-separated list of numbers"),
        (("--cache-weights", "1,1"), "--cache given 2 times without --ensemble"),
    ],
)
def test_bad_ensemble_settings_are_refused_naming_the_flag(train, extra, message, train_cache, second_cache, tmp_path):
    result = train([train_cache, second_cache], tmp_path / "out", *extra)
    assert result.exit_code != 0 and message in result.output, result.output


def test_ensemble_of_one_cache_is_refused(train, train_cache, tmp_path):
    result = train([train_cache], tmp_path / "out", "--ensemble", "mean_prob")
    assert result.exit_code != 0 and "needs a --cache for each teacher" in result.output


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="needs make")
def test_make_student_train_passes_the_ensemble_curriculum_and_adaptive_temperature():
    from helpers import make_dry_run

    settings = {
        "CACHE": "caches/a",
        "ENSEMBLE_CACHES": "caches/b caches/c",
        "ENSEMBLE": "mean_logprob",
        "CACHE_WEIGHTS": "0.5,0.3,0.2",
        "ADAPT_TEMPERATURE": "1",
        "TEMPERATURE": "4",
        "CURRICULUM": "confidence",
        "CURRICULUM_PACING": "linear",
        "CURRICULUM_START": "0.1",
        "CURRICULUM_SPAN": "0.3",
    }
    left_out = {*settings, "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "OUT", "STUDENT"}
    (command,), output = make_dry_run("student-train", settings, left_out)
    assert command[0] == "student-train", output
    caches = [command[i + 1] for i, word in enumerate(command) if word == "--cache"]
    assert caches == ["caches/a", "caches/b", "caches/c"]
    assert command[command.index("--ensemble") + 1] == "mean_logprob"
    assert command[command.index("--cache-weights") + 1] == "0.5,0.3,0.2"
    assert "--adapt-temperature" in command and command[command.index("--temperature") + 1] == "4"
    for flag, value in (("--curriculum", "confidence"), ("--curriculum-pacing", "linear")):
        assert command[command.index(flag) + 1] == value
    assert command[command.index("--curriculum-start") + 1] == "0.1"
    assert command[command.index("--curriculum-span") + 1] == "0.3"
    (plain,), _ = make_dry_run("student-train", {"CACHE": "caches/a"}, left_out)
    assert "--ensemble" not in plain and "--adapt-temperature" not in plain and plain.count("--cache") == 1
    assert not any(word.startswith("--curriculum") for word in plain)
