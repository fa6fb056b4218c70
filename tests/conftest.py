"""Shared fixtures: a tokenizer trained here, tiny random models from configs, tiny text.

Nothing touches the network: the Hub is switched off for the whole session.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Remembered weight hashes go to a folder of this session, never the user's cache.
os.environ["DISTILL_HASH_CACHE"] = os.path.join(
    __import__("tempfile").mkdtemp(prefix="distill-hash-cache-"), "file-hashes.json"
)
# Downloads of remote caches, and staging of remote --out, likewise.
os.environ["DISTILL_REMOTE_CACHE"] = __import__("tempfile").mkdtemp(prefix="distill-remote-")


def pytest_report_header(config: pytest.Config) -> str:
    """Golden bytes depend on the compressor: name the libzstd the run used."""
    import zstandard

    return f"libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))} (python-zstandard {zstandard.__version__})"


WORDS = [
    "the",
    "a",
    "teacher",
    "student",
    "model",
    "learns",
    "small",
    "large",
    "cache",
    "shard",
    "token",
    "vocabulary",
    "quickly",
    "slowly",
    "writes",
    "reads",
    "every",
    "each",
    "distribution",
    "probability",
    "mass",
    "river",
    "mountain",
    "city",
    "garden",
    "window",
    "bright",
    "quiet",
    "green",
    "blue",
    "seven",
    "eleven",
    "runs",
    "walks",
    "sings",
    "jumps",
    "under",
    "over",
    "near",
    "beside",
    "and",
    "but",
]


def make_sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        length = rng.randint(5, 14)
        words = [rng.choice(WORDS[: 20 + rng.randint(0, len(WORDS) - 20)]) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def make_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(make_sentences(rng.randint(2, 6), seed * 1000 + i)) for i in range(count)]


def train_tokenizer(folder: Path, texts: list[str], vocab_size: int, specials: tuple[str, ...]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    bos = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="session")
def tokenizer_dir(workdir: Path) -> Path:
    texts = make_documents(200, seed=1)
    return train_tokenizer(workdir / "tokenizer", texts, 300, ("<pad>", "<bos>", "<eos>", "<unk>"))


@pytest.fixture(scope="session")
def other_tokenizer_dir(workdir: Path) -> Path:
    texts = make_documents(200, seed=99)
    return train_tokenizer(workdir / "other-tokenizer", texts, 280, ("<pad>", "<bos>", "<eos>", "<unk>"))


def tiny_llama_config(vocab_size: int, hidden: int, layers: int = 2, init: float = 0.02):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


# Logit width deliberately larger than the tokenizer (padded embeddings), as in real models.
LOGIT_WIDTH = 320


@pytest.fixture(scope="session")
def teacher_dir(workdir: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with a sharp output distribution, saved with weights and tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(LOGIT_WIDTH, 64, init=0.2), dtype=torch.float32)
    folder = workdir / "teacher"
    model.save_pretrained(str(folder))
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="session")
def student_config_dir(workdir: Path) -> Path:
    """A config-only student folder (no weights), as ``data/`` ships one."""
    folder = workdir / "student-config"
    folder.mkdir()
    config = tiny_llama_config(LOGIT_WIDTH, 32).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def corpus(workdir: Path) -> dict[str, Path]:
    """Train and held-out text as .jsonl, and a folder of .txt documents."""
    folder = workdir / "corpus"
    folder.mkdir()
    paths = {}
    for name, count, seed in (("train", 120, 2), ("heldout", 24, 3)):
        path = folder / f"{name}.jsonl"
        with open(path, "w") as handle:
            for index, text in enumerate(make_documents(count, seed)):
                handle.write(json.dumps({"text": text, "id": index}) + "\n")
        paths[name] = path
    txt = folder / "txt"
    txt.mkdir()
    for index, text in enumerate(make_documents(6, 4)):
        (txt / f"doc{index}.txt").write_text(text.replace(". ", ".\n"))
    paths["txt"] = txt
    return paths


def edit_manifest(cache: Path, change, reseal: bool = True) -> None:
    """Change a cache's manifest; ``reseal`` recomputes its checksum so the change itself is what gets judged."""
    from pipeline.manifest import render_manifest
    from pipeline.store.layout import MANIFEST_NAME

    path = cache / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_bytes(render_manifest(manifest) if reseal else json.dumps(manifest).encode())


def with_custom_code(model_dir: Path, dest: Path) -> Path:
    """A copy of ``model_dir`` whose config maps to Python files inside it, as custom Hub models do."""
    import shutil

    shutil.copytree(model_dir, dest)
    (dest / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n"
    )
    (dest / "modeling_tinycustom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinycustom import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )
    config = json.loads((dest / "config.json").read_text())
    config.update(
        model_type="tinycustom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
        },
    )
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def run_cli(*args: str):
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def make_cache(teacher: Path, dataset: Path, out: Path, *options: str) -> Path:
    """Run ``distill teacher-cache`` in process; fail the test with its output if it fails."""
    result = run_cli("teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out), *options)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def train_cache(workdir: Path, teacher_dir: Path, corpus: dict[str, Path]) -> Path:
    options = ("--seq-len", "32", "--top-k", "16", "--shard-tokens", "512", "--batch-size", "4")
    return make_cache(teacher_dir, corpus["train"], workdir / "cache-train", *options)


@pytest.fixture(scope="session")
def heldout_cache(workdir: Path, teacher_dir: Path, corpus: dict[str, Path]) -> Path:
    return make_cache(teacher_dir, corpus["heldout"], workdir / "cache-heldout", "--seq-len", "32", "--top-k", "16")
