import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.data import (
    SkippedDocuments,
    first_invalid_utf8,
    open_text_stream,
    pack_records,
    pack_sequences,
    skip_documents_with_ids_from,
    tokenize_documents,
    tokenize_records,
)
from pipeline.errors import DatasetError, SourceNotFoundError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_each_document_gets_bos_from_the_tokenizer_and_eos_appended(tokenizer):
    docs = ["The cache writes.", "A student learns."]
    encoded = list(tokenize_documents(docs, tokenizer))
    for text, ids in zip(docs, encoded):
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id
        assert ids[:-1] == tokenizer(text)["input_ids"]


def test_packing_cuts_fixed_sequences_and_drops_the_tail():
    docs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    packed = list(pack_sequences(docs, seq_len=5))
    assert [p.tolist() for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert all(p.dtype == np.int64 for p in packed)


def test_packing_stops_at_max_sequences():
    docs = [list(range(100))]
    assert len(list(pack_sequences(docs, seq_len=10, max_sequences=3))) == 3


def test_txt_files_are_one_document_each_by_default(corpus):
    stream = open_text_stream(str(corpus["txt"]))
    documents = list(stream.documents)
    assert len(documents) == 6
    assert all("\n" in doc for doc in documents)  # lines kept together


def test_txt_files_split_by_line_on_request(corpus):
    documents = list(open_text_stream(str(corpus["txt"]), txt_sample_by="line").documents)
    assert len(documents) > 6


def test_jsonl_text_column(corpus):
    stream = open_text_stream(str(corpus["train"]))
    first = next(iter(stream.documents))
    expected = json.loads(corpus["train"].read_text().splitlines()[0])["text"]
    assert first == expected
    assert stream.display == "train.jsonl"


def test_parquet_files_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one doc", "two docs"]}), tmp_path / "part.parquet")
    assert list(open_text_stream(str(tmp_path), text_column="body").documents) == ["one doc", "two docs"]


def test_missing_text_column_names_the_columns(corpus):
    with pytest.raises(DatasetError, match=r"no column 'content' \(columns: id, text\).*--text-column"):
        open_text_stream(str(corpus["train"]), text_column="content")


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        open_text_stream(str(tmp_path / "empty.jsonl"))


def test_missing_path_is_refused():
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        open_text_stream("./no/such/data.jsonl")


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(SourceNotFoundError, match="cannot read dataset 'nobody/no-such-dataset'"):
        open_text_stream("nobody/no-such-dataset")


def test_unsupported_file_type_is_refused(tmp_path):
    (tmp_path / "data.csvx").write_text("x")
    with pytest.raises(DatasetError):
        open_text_stream(str(tmp_path))


def test_arrow_files_are_read(tmp_path):
    import pyarrow as pa

    table = pa.table({"text": ["first doc", "second doc"]})
    with pa.OSFile(str(tmp_path / "part.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert list(open_text_stream(str(tmp_path / "part.arrow")).documents) == ["first doc", "second doc"]


def test_txt_paragraph_mode_splits_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\nstill one\n\ntwo\n\n\nthree")
    documents = [d for d in open_text_stream(str(tmp_path / "a.txt"), txt_sample_by="paragraph").documents if d.strip()]
    assert len(documents) == 3


def test_first_invalid_utf8_byte_is_found_across_block_boundaries(tmp_path):
    text = "caf\u00e9 \u20ac \U0001f600 ok".encode()
    path = tmp_path / "a.txt"
    for damage_at in range(len(text) + 1):
        data = text[:damage_at] + b"\xff" + text[damage_at:]
        path.write_bytes(data)
        expected = _first_bad(data)
        for block in (1, 2, 3, 7, 1 << 20):
            assert first_invalid_utf8(path, block) == expected, (damage_at, block)
    path.write_bytes(text)
    assert first_invalid_utf8(path, 2) is None
    path.write_bytes(text + "\u20ac".encode()[:2])  # cut inside the last character
    assert first_invalid_utf8(path, 3) == len(text)


def _first_bad(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    raise AssertionError("expected invalid UTF-8")


@pytest.fixture()
def latin1_folder(tmp_path):
    (tmp_path / "a.txt").write_text("plain words")
    (tmp_path / "b.txt").write_bytes("caf\u00e9".encode("latin-1"))
    return tmp_path


def test_non_utf8_txt_is_refused_by_default_naming_file_and_byte(latin1_folder):
    with pytest.raises(DatasetError, match=r"b\.txt' is not valid UTF-8 \(byte 3\).*replace.*skip-file"):
        open_text_stream(str(latin1_folder))


def test_non_utf8_txt_is_read_with_replacement_characters_on_request(latin1_folder):
    documents = list(open_text_stream(str(latin1_folder), txt_encoding_errors="replace").documents)
    assert documents == ["plain words", "caf\ufffd"]


def test_non_utf8_txt_is_left_out_and_named_on_request(latin1_folder):
    stream = open_text_stream(str(latin1_folder), txt_encoding_errors="skip-file")
    assert list(stream.documents) == ["plain words"]
    assert stream.skipped_files == ("b.txt",)


def test_a_folder_with_no_utf8_file_is_refused_even_when_skipping(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DatasetError, match="no file of dataset"):
        open_text_stream(str(tmp_path), txt_encoding_errors="skip-file")


def test_read_error_while_iterating_names_the_file(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    (tmp_path / "b.jsonl").write_text('{"text": "cut off')
    documents = iter(open_text_stream(str(tmp_path)).documents)
    assert [next(documents) for _ in range(5)] == [f"doc {i}" for i in range(5)]
    with pytest.raises(DatasetError, match=r"cannot read file 'b\.jsonl' of dataset"):
        next(documents)


def test_documents_with_ids_from_the_limit_are_skipped_and_counted():
    skipped = SkippedDocuments()
    records = [(0, [1, 2]), (1, [3, 9]), (2, []), (3, [4, 10, 5])]
    kept = list(skip_documents_with_ids_from(records, 9, skipped))
    assert kept == [(0, [1, 2]), (2, [])]
    assert skipped.count == 2
    assert list(skip_documents_with_ids_from([(0, [1, 99])], None, skipped)) == [(0, [1, 99])]


def test_each_packed_sequence_names_the_record_and_offset_of_its_first_token():
    records = [(0, [10, 11, 12]), (2, [20, 21, 22, 23, 24, 25, 26]), (3, [30]), (5, [40, 41, 42, 43])]
    packed = list(pack_records(records, seq_len=4))
    stream = [token for _, ids in records for token in ids]
    origin = [(record, offset) for record, ids in records for offset in range(len(ids))]
    assert len(packed) == len(stream) // 4
    for number, sequence in enumerate(packed):
        assert sequence.input_ids.tolist() == stream[number * 4 : number * 4 + 4]
        assert (sequence.source_record, sequence.record_offset) == origin[number * 4]


def test_record_indices_count_blank_documents(tokenizer):
    indexed = list(tokenize_records(["first words", "", "   ", "fourth words"], tokenizer))
    assert [index for index, _ in indexed] == [0, 3]


def test_file_starts_name_each_file_with_its_first_record(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a0"}\n{"text": ""}\n{"text": "a2"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b0"}\n')
    stream = open_text_stream(str(tmp_path))
    assert list(stream.documents) == ["a0", "", "a2", "b0"]
    assert stream.file_starts == [("a.jsonl", 0), ("b.jsonl", 3)]


def test_packing_restarted_at_a_written_sequence_continues_the_same_stream():
    from pipeline.data import pack_records

    documents = [(index, list(range(index * 100, index * 100 + size))) for index, size in enumerate([5, 17, 3, 40, 9])]
    whole = list(pack_records(documents, 7))
    assert len(whole) == 10
    for index, sequence in enumerate(whole):
        later = [(record, ids) for record, ids in documents if record >= sequence.source_record]
        restarted = list(pack_records(later, 7, None, sequence.record_offset, index))
        assert [(s.input_ids.tolist(), s.source_record, s.record_offset) for s in restarted] == [
            (s.input_ids.tolist(), s.source_record, s.record_offset) for s in whole[index:]
        ]
        capped = list(pack_records(later, 7, 6, sequence.record_offset, index))
        assert len(capped) == max(0, 6 - index)  # --max-tokens counts from the stream's start
