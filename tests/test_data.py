"""`nestc run --data`: pre-tokenized token files (memory-mapped) and Hugging Face datasets
(streamed), beside the text files of tests/test_run.py."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter

import pytest
import torch
from click.testing import CliRunner

from nestc.cli import cli
from nestc.runtime import data
from nesttest import TINY_RUN



@pytest.fixture(autouse=True)
def _at_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _run(*args):
    return CliRunner().invoke(cli, ["run", "specs/deltanet.nest", *args])


def _write_ids(path, ids: list[int], dtype: torch.dtype) -> None:
    path.write_bytes(bytes(torch.tensor(ids, dtype=torch.int64).to(dtype).untyped_storage()))


def _spread_ids(count: int, vocab: int) -> list[int]:
    """Ids that reach `vocab - 1`, unevenly spread (so the unigram baseline is not log2 vocab)."""
    return [(i * i + 7 * i) % vocab for i in range(count)]


@pytest.mark.parametrize("name,dtype", [("ids.bin", torch.uint16), ("ids.u16.bin", torch.uint16),
                                        ("ids.u32.bin", torch.uint32)])
def test_a_token_file_is_mapped_in_place_with_the_id_type_its_name_says(name, dtype, tmp_path, monkeypatch):
    path = tmp_path / name
    ids = _spread_ids(3000, 70_000 if dtype == torch.uint32 else 60_000)
    _write_ids(path, ids, dtype)
    mapped = []
    from_file = torch.from_file
    monkeypatch.setattr(torch, "from_file", lambda *a, **k: mapped.append((a, k)) or from_file(*a, **k))
    corpus = data.load([str(path)])
    # a private (copy-on-write) mapping of the whole file: pages are read as windows touch them
    assert mapped == [((str(path),), {"shared": False, "size": 3000, "dtype": dtype})]
    assert corpus.tokenized and corpus.symbols.dtype == dtype
    assert corpus.symbols.tolist() == ids
    train, held_out = data.split(corpus.symbols)
    assert train.tolist() == ids[:2700] and held_out.tolist() == ids[2700:]
    assert data.windows(train, [5, 100], 4).tolist() == [ids[5:9], ids[100:104]]


def test_a_run_on_a_token_file_trains_on_its_ids_split_as_bytes_are(tmp_path):
    """The baseline the run prints is the unigram cross-entropy of the file's last tenth under its
    first nine tenths' counts (computed here from the ids); the sample in report.md is ids."""
    vocab = 300
    ids = _spread_ids(4000, vocab)
    path = tmp_path / "ids.u32.bin"
    _write_ids(path, ids, torch.uint32)
    result = _run("--data", str(path), "--steps", "2", "--runs", str(tmp_path / "runs"), *TINY_RUN,
                  "--set", f"model.vocab={vocab}")
    assert result.exit_code == 0, result.output
    train, held_out = ids[:3600], ids[3600:]
    seen = Counter(train)
    expected = -sum(math.log2((seen[i] + 1) / (len(train) + vocab)) for i in held_out) / len(held_out)
    printed = float(re.search(r"unigram baseline ([0-9.]+) bits/token", result.output).group(1))
    assert abs(printed - expected) < 5e-4
    (run,) = (tmp_path / "runs").iterdir()
    sample = (run / "report.md").read_text().split("the sample written after it:")[1]
    assert re.search(r"\d+ \d+ \d+", sample)
    written = CliRunner().invoke(cli, ["generate", str(run), "--length", "5"])
    assert written.exit_code == 0, written.output


def test_bad_token_files_are_clear_errors(tmp_path):
    runs = ["--runs", str(tmp_path / "runs")]
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    odd = tmp_path / "odd.u32.bin"
    odd.write_bytes(b"\x01\x00\x00\x00\x02\x00")
    short = tmp_path / "short.bin"
    _write_ids(short, list(range(40)), torch.uint16)
    large = tmp_path / "large.bin"
    _write_ids(large, [3, 999, 5] * 400, torch.uint16)
    text = tmp_path / "text.txt"
    text.write_text("some text " * 200)
    cases = [
        ([str(empty)], f"--data {empty}: the token file is empty"),
        ([str(odd)], f"--data {odd}: 6 bytes is not a whole number of uint32 token ids"),
        ([str(short)], "train.context is 32 tokens, but the corpus's shorter split has only 4"),
        ([str(large)], f"--data {large}: token ids reach 999, but the model's vocab is 256: --set model.vocab=1000"),
        ([str(large), str(text)], "a token file or a dataset is a run's only --data"),
        ([str(tmp_path / "absent.bin")], "cannot read it: No such file or directory"),
    ]
    for paths, message in cases:
        result = _run(*[a for p in paths for a in ("--data", p)], *runs, *TINY_RUN)
        assert result.exit_code == 2, (paths, result.output)
        assert message in result.output and "Traceback" not in result.output, (paths, result.output)


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets", reason="Hugging Face datasets need the nestc[data] extra "
                                                  "(pip install 'nestc[data]')")


def _documents(path, count: int) -> list[str]:
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 10 for i in range(count)]
    path.write_text("".join(json.dumps({"text": t, "number": i}) + "\n" for i, t in enumerate(texts)))
    return texts


def test_a_dataset_is_streamed_only_as_far_as_the_run_needs(datasets, tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = _documents(path, 400)  # about 180 KB
    wanted = data.HF_BYTES_AT_LEAST  # 64 KB
    corpus = data.load([f"hf:{path}"], wanted)
    documents = corpus.symbols.split(b"\n\n")
    assert [d.decode() for d in documents] == texts[:len(documents)]  # in order, whole documents
    assert len(corpus.symbols) >= wanted > len(corpus.symbols) - len(documents[-1]) - 2  # stopped at the first enough
    everything = data.load([f"hf:{path}"], 10 * len(path.read_bytes()))
    assert everything.symbols == "\n\n".join(texts).encode()  # a dataset smaller than wanted: all of it


def test_a_saved_dataset_and_a_named_split_and_column_load(datasets, tmp_path):
    texts = [f"saved {i} " * 40 for i in range(60)]
    split = datasets.Dataset.from_dict({"body": texts, "number": list(range(60))})
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path / "saved"))
    corpus = data.load([f"hf:{tmp_path / 'saved'}:validation:body"])
    assert corpus.symbols == "\n\n".join(texts).encode()
    with pytest.raises(data.DataError, match=r"has no split `train` \(its splits: validation\)"):
        data.load([f"hf:{tmp_path / 'saved'}"])


def test_a_run_trains_on_a_streamed_dataset(datasets, tmp_path):
    path = tmp_path / "docs.jsonl"
    _documents(path, 200)
    result = _run("--data", f"hf:{path}", "--steps", "2", "--runs", str(tmp_path / "runs"), *TINY_RUN)
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.output


def test_datasets_that_cannot_be_read_are_clear_errors(datasets, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no test reaches the network
    path = tmp_path / "docs.jsonl"
    _documents(path, 50)
    cases = [
        (f"hf:{path}:train:body", "the dataset has no column `body` (its columns: text, number)"),
        (f"hf:{path}:train:number", "column `number` holds int, not text"),
        (f"hf:{path}:test", "cannot load the dataset (Bad split: test"),
        ("hf:nestc-no-such-user/no-such-dataset", "hf:nestc-no-such-user/no-such-dataset: cannot load the dataset"),
        ("hf:", "write a dataset as hf:NAME_OR_PATH[:SPLIT[:COLUMN]]"),
        (f"hf:{path}:train:text:extra", "write a dataset as hf:NAME_OR_PATH[:SPLIT[:COLUMN]]"),
    ]
    for source, message in cases:
        result = _run("--data", source, "--runs", str(tmp_path / "runs"), *TINY_RUN)
        assert result.exit_code == 2, (source, result.output)
        assert message in result.output and "Traceback" not in result.output, (source, result.output)


def test_the_unigram_baseline_is_the_add_one_cross_entropy_even_past_the_vocab():
    """Train counts a, b, c, z once each (add-one over a vocab of 50: a total of 54); the held-out
    zzzy scores z at 2/54 three times and the unseen y at 1/54 (ids above the vocab count too)."""
    expected = -(3 * math.log2(2 / 54) + math.log2(1 / 54)) / 4
    assert abs(data.unigram_bits(b"abcz", b"zzzy", 50) - expected) < 1e-12
    assert abs(data.unigram_bits(torch.tensor([97, 98, 99, 122]), [122, 122, 122, 121], 50) - expected) < 1e-12


def test_a_dataset_without_the_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(data.DataError, match=r"needs? the `datasets` package: pip install 'nestc\[data\]'"):
        data.load([f"hf:{tmp_path / 'docs.jsonl'}"])
