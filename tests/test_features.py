"""Feature distillation's pure parts: the layer map, the projectors, and the two losses."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.features import LayerPair, Projectors, feature_loss, parse_layer_map, resolve_pairs


def test_the_layer_map_parses_and_resolves_against_the_stored_layers():
    assert parse_layer_map("4:8,-1:-1") == ((4, 8), (-1, -1))
    assert resolve_pairs(((4, 8), (-1, -1)), 6, 18, (8, 18)) == (LayerPair(4, 8), LayerPair(6, 18))
    for value in ("4", "4:x", "4-8"):
        with pytest.raises(ConfigError, match="each pair is STUDENT:TEACHER"):
            parse_layer_map(value)
    with pytest.raises(ConfigError, match=r"student layer 7 is outside 0 \.\. 6"):
        resolve_pairs(((7, 8),), 6, 18, (8,))
    with pytest.raises(ConfigError, match="stores teacher layers 8, 18, not 16"):
        resolve_pairs(((2, 16),), 6, 18, (8, 18))
    with pytest.raises(ConfigError, match="student layer twice"):
        resolve_pairs(((2, 8), (-5, 18)), 6, 18, (8, 18))


def test_projectors_start_from_the_seed_and_learn_with_the_student():
    pairs = (LayerPair(1, 2), LayerPair(2, 4))
    first, again, other = (
        Projectors(pairs, 16, 24, seed=3),
        Projectors(pairs, 16, 24, seed=3),
        Projectors(pairs, 16, 24, 4),
    )
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not torch.equal(next(first.parameters()), next(other.parameters()))
    assert not torch.equal(first.maps[0].weight, first.maps[1].weight)  # each pair its own start
    assert isinstance(Projectors(pairs, 24, 24, seed=3).maps[0], torch.nn.Identity)
    student_states = torch.randn(2, 5, 16, requires_grad=True)
    loss = feature_loss(first(0, student_states), torch.randn(2, 5, 24), "mse")
    loss.backward()
    assert first.maps[0].weight.grad is not None and first.maps[0].weight.grad.abs().sum() > 0
    assert student_states.grad is not None and student_states.grad.abs().sum() > 0
    assert first.maps[1].weight.grad is None


def test_the_losses_match_their_definitions_and_skip_masked_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    assert torch.allclose(feature_loss(student, teacher, "mse"), ((student - teacher) ** 2).mean())
    cosine = 1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    assert torch.allclose(feature_loss(student, teacher, "cosine"), cosine.mean(), atol=1e-6)
    assert feature_loss(teacher * 3, teacher, "cosine").abs() < 1e-6  # scale-free
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :2] = True
    assert torch.allclose(feature_loss(student, teacher, "mse", mask), ((student - teacher) ** 2)[0, :2].mean())
    assert feature_loss(student, teacher, "mse", torch.zeros(2, 6, dtype=torch.bool)) == 0


@pytest.fixture(scope="module")
def feature_cache(teacher_dir, corpus, tmp_path_factory):
    from conftest import run_cli

    cache = tmp_path_factory.mktemp("features") / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(cache),
        "--seq-len", "16", "--top-k", "4", "--max-tokens", "320", "--hidden-layers", "1,-1", "--hidden-dim", "24",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return cache


def test_the_feature_loss_trains_the_projectors_with_the_student_and_they_are_saved_apart(
    feature_cache, student_config_dir, tmp_path
):
    import json

    from conftest import run_cli
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    result = run_cli(
        "student-train", "--cache", str(feature_cache), "--student", str(student_config_dir), "--out", str(out),
        "--max-steps", "3", "--batch-size", "2", "--log-every", "1", "--feature-loss", "cosine",
        "--layer-map", "1:1,-1:-1", "--feature-weight", "0.5", "--save-every", "2", "--lr", "0.01",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["feature"] > 0 for line in lines)
    for line in lines:  # the logged loss includes the weighted feature loss
        assert abs(line["loss"] - (0.5 * line["kd"] + 0.5 * line["ce"] + 0.5 * line["feature"])) < 1e-5
    projectors = load_file(str(out / "projectors.safetensors"))
    assert sorted(projectors) == ["maps.0.weight", "maps.1.weight"] and projectors["maps.0.weight"].shape == (24, 32)
    start = Projectors((LayerPair(1, 1), LayerPair(2, 2)), 32, 24, seed=0)
    assert not torch.equal(projectors["maps.0.weight"], start.maps[0].weight.detach())  # trained
    student = AutoModelForCausalLM.from_pretrained(str(out))  # the export holds the student alone
    assert not any("projector" in name for name, _ in student.named_parameters())


def test_the_feature_loss_is_refused_without_stored_states_or_with_an_unstored_layer(
    feature_cache, train_cache, student_config_dir, tmp_path
):
    from conftest import run_cli

    common = ["--student", str(student_config_dir), "--out", str(tmp_path / "s"), "--max-steps", "1"]
    result = run_cli(
        "student-train", "--cache", str(train_cache), *common, "--feature-loss", "mse", "--layer-map", "1:1"
    )
    assert result.exit_code == 1 and "stores none; write it with teacher-cache --hidden-layers" in result.output
    result = run_cli(
        "student-train", "--cache", str(feature_cache), *common, "--feature-loss", "mse", "--layer-map", "1:0"
    )
    assert result.exit_code == 1 and "stores teacher layers 1, 2, not 0" in result.output
    result = run_cli("student-train", "--cache", str(feature_cache), *common, "--feature-loss", "mse")
    assert result.exit_code == 1 and "go together" in result.output
