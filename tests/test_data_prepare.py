"""prepare / manifest / verify / demo corpus (hymoe.data), on small synthetic text in tmp_path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import hymoe.data.prepare as prepare_mod
import pytest
from hymoe.data import DataError, demo_corpus_files, fingerprint, load_tokenizer, verify
from hymoe.data.corpus import stdlib_root
from hymoe.data.manifest import first_keys
from hymoe.data.prepare import prepare
from hymoe.data.shards import decode_documents, read_members

WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "café", "日本", "\n", "    ",
         "<|endoftext|>", "🙂", "loss", "tokens", "0.5", "+", ":"]


def write_corpus(root: Path, n_txt: int = 24, n_jsonl: int = 16, seed: int = 0) -> list[str]:
    """Text files plus one .jsonl; returns every document's text in prepare order."""
    rng = random.Random(seed)

    def doc(i: int) -> str:
        return f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))

    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_txt):
        t = doc(i)
        (root / f"doc{i:03d}.txt").write_bytes(t.encode())  # bytes: keep "\r\n"-free text exact
        texts.append(t)
    lines = [doc(n_txt + i) for i in range(n_jsonl)]
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return texts + lines


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    texts = write_corpus(base / "in")
    inputs = [str(base / "in" / "*.txt"), str(base / "in" / "more.jsonl")]
    m = prepare(inputs, base / "out", train_tokenizer_vocab=400, shard_tokens=1000, progress=False)
    return base, inputs, texts, m


def all_docs(out: Path, m: dict) -> list:
    return [d for s, k in zip(m["shards"], first_keys(m))
            for d in decode_documents((out / s["name"]).read_bytes(), m["dtype"], k, s["name"])]


def test_demo_corpus_is_deterministic_and_bounded():
    a, b = demo_corpus_files(300_000), demo_corpus_files(300_000)
    assert a == b and len(a) > 5
    total = sum(p.stat().st_size for p in a)
    assert 250_000 < total <= 300_000
    for p in a:
        parts = p.relative_to(stdlib_root()).parts
        assert p.suffix == ".py" and not {"site-packages", "test", "tests", "idlelib"} & set(parts)
    with pytest.raises(ValueError, match="10_000_000"):
        demo_corpus_files(20_000_000)


def test_totals_and_round_trip(prepared):
    base, _, texts, m = prepared
    out = base / "out"
    tok = load_tokenizer(out / "tokenizer.json")
    tok.encode_special_tokens = True  # as prepare encodes: "<|endoftext|>" in text is plain text
    counts = [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]
    assert m["totals"]["documents"] == len(texts)
    assert m["totals"]["tokens"] == sum(counts) == sum(s["tokens"] for s in m["shards"])
    assert len(m["shards"]) > 3 and m["dtype"] == "uint16"
    assert m["tokenizer"]["fingerprint"] == fingerprint(out / "tokenizer.json")
    # A tiny corpus may run out of merges before 400: the manifest holds the real size.
    assert m["tokenizer"]["eod_id"] == 0 and 300 < m["tokenizer"]["vocab_size"] <= 400
    docs = all_docs(out, m)
    assert [len(d) for d in docs] == counts
    for i in (0, len(texts) - 1):  # a .txt document and a .jsonl one
        assert tok.decode(docs[i].tolist(), skip_special_tokens=False) == texts[i]
    # A document that mentions the EOD string holds no EOD id: only the loader adds those.
    with_eod_text = [i for i, t in enumerate(texts) if "<|endoftext|>" in t]
    assert with_eod_text and all(0 not in docs[i] for i in with_eod_text)


def test_rerun_returns_manifest_and_other_inputs_are_refused(prepared):
    base, inputs, _, m = prepared
    assert prepare(inputs, base / "out", train_tokenizer_vocab=400, shard_tokens=1000,
                   progress=False) == m
    with pytest.raises(DataError, match="already holds"):
        prepare(inputs[:1], base / "out", train_tokenizer_vocab=400, progress=False)


def test_given_tokenizer_and_workers_give_identical_shards(prepared, tmp_path):
    base, inputs, _, m = prepared
    m2 = prepare(inputs, tmp_path / "o", tokenizer=str(base / "out" / "tokenizer.json"),
                 shard_tokens=1000, workers=2, progress=False)
    assert m2["shards"] == m["shards"] and m2["tokenizer"] == m["tokenizer"]


def test_interrupted_prepare_resumes(prepared, tmp_path, monkeypatch):
    base, inputs, _, m = prepared
    real, calls = prepare_mod.write_shard, []

    def crash_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    tok = str(base / "out" / "tokenizer.json")
    monkeypatch.setattr(prepare_mod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, tmp_path / "o", tokenizer=tok, shard_tokens=1000, progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()
    monkeypatch.setattr(prepare_mod, "write_shard", real)
    resumed = prepare(inputs, tmp_path / "o", tokenizer=tok, shard_tokens=1000, progress=False)
    assert resumed["shards"] == m["shards"] and verify(tmp_path / "o") == []


def test_needs_a_tokenizer(tmp_path):
    write_corpus(tmp_path / "in", 2, 1)
    with pytest.raises(DataError, match="--train-tokenizer"):
        prepare([str(tmp_path / "in")], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare([str(tmp_path / "nope*.txt")], tmp_path / "o", train_tokenizer_vocab=300)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{f}:4: not valid JSON"):
        prepare([str(f)], tmp_path / "o", train_tokenizer_vocab=300, progress=False)
    f.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: no string field 'text'"):
        prepare([str(f)], tmp_path / "o2", train_tokenizer_vocab=300, progress=False)


def damaged_copies(base: Path, m: dict, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One copy of the prepared dir per kind of damage, each to shard 1: kind → (dir, shard)."""
    name = m["shards"][1]["name"]
    out = {}
    for kind in ("truncated", "flipped", "header"):
        d = tmp_path / kind
        shutil.copytree(base / "out", d)
        p = d / name
        data = bytearray(p.read_bytes())
        members = read_members(bytes(data), name)
        if kind == "truncated":
            data = data[: len(data) // 2]
        elif kind == "flipped":  # one bit of the second document's payload
            data[members[1][1]] ^= 0x01
        else:  # garbage over the second member's tar header
            data[members[1][1] - 512 : members[1][1] - 412] = b"\xab" * 100
        p.write_bytes(bytes(data))
        out[kind] = (d, name)
    return out


def test_verify_finds_each_damage(prepared, tmp_path):
    base, _, _, m = prepared
    assert verify(base / "out") == []
    for kind, (d, name) in damaged_copies(base, m, tmp_path).items():
        problems = verify(d)
        assert problems, kind
        assert all(line.startswith(name + ":") for line in problems), (kind, problems)
    # The structural damage is reported as such, not only as a hash mismatch.
    assert any("unreadable" in line for line in verify(tmp_path / "header"))
    assert any("unreadable" in line for line in verify(tmp_path / "truncated"))
    (tmp_path / "header" / "manifest.json").write_text('{"version": 1, "tokenizer": 3}')
    (line,) = verify(tmp_path / "header")
    assert "manifest.json" in line and "'tokenizer'" in line


def test_directory_input_skips_hidden_files_and_the_output(tmp_path):
    texts = write_corpus(tmp_path / "in", 3, 0)
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\xff\xfe binary")
    out = tmp_path / "in" / "prepared"  # output inside the input directory
    m = prepare([str(tmp_path / "in")], out, train_tokenizer_vocab=300, progress=False)
    assert m["totals"]["documents"] == len(texts)
    # Re-running sees the same inputs (not its own outputs), so it is the same finished job.
    assert prepare([str(tmp_path / "in")], out, train_tokenizer_vocab=300, progress=False) == m


def test_parquet_and_text_field_give_the_same_shards_as_jsonl(prepared, tmp_path):
    """A parquet column (several row groups) and a jsonl field of another name hold the same
    documents as `text` jsonl lines: all three give the same tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, _, texts, _ = prepared
    tok = str(base / "out" / "tokenizer.json")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), tmp_path / "c.parquet",
                   row_group_size=7)
    runs = {}
    for name, field in (("a.jsonl", "text"), ("b.jsonl", "body"), ("c.parquet", "body")):
        out = tmp_path / f"out_{name}"
        m = prepare([str(tmp_path / name)], out, tokenizer=tok, shard_tokens=1000, progress=False,
                    text_field=field)
        runs[name] = [d.tolist() for d in all_docs(out, m)]
    assert len(runs["a.jsonl"]) == len(texts)
    assert runs["a.jsonl"] == runs["b.jsonl"] == runs["c.parquet"]


def test_parquet_errors_name_the_file_and_column(prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = str(prepared[0] / "out" / "tokenizer.json")
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x", "y"], "n": [1, 2]}), f)
    with pytest.raises(DataError, match=rf"{f}: no column 'text' \(columns: body, n\).*--text-field"):
        prepare([str(f)], tmp_path / "o", tokenizer=tok, progress=False)
    with pytest.raises(DataError, match=rf"{f}: column 'n' is int64, not a string column"):
        prepare([str(f)], tmp_path / "o2", tokenizer=tok, progress=False, text_field="n")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"{bad}: not a readable parquet file"):
        prepare([str(bad)], tmp_path / "o3", tokenizer=tok, progress=False)


def test_valid_every_holds_out_documents_with_the_same_tokenizer(prepared, tmp_path):
    """`hymoe data prepare --valid-every 5`: documents 4, 9, 14, … go to OUTPUT/valid, every other
    document to OUTPUT, in order, each exactly once; one tokenizer (trained on the training side);
    both verify clean and are what training (data.path) and validation (data.valid_path) read."""
    from helpers import hymoe

    base, inputs, texts, _ = prepared
    out = tmp_path / "split"
    r = hymoe("data", "prepare", "--input", *inputs, "--output", str(out), "--train-tokenizer", "400",
              "--shard-tokens", "1000", "--valid-every", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held out 8 documents" in r.stdout
    train_m = json.loads((out / "manifest.json").read_text())
    valid_m = json.loads((out / "valid" / "manifest.json").read_text())
    assert valid_m["tokenizer"] == train_m["tokenizer"]
    tok = load_tokenizer(out / "tokenizer.json")
    tok.encode_special_tokens = True

    def decoded(folder, m):
        return [tok.decode(d.tolist(), skip_special_tokens=False) for d in all_docs(folder, m)]

    assert decoded(out / "valid", valid_m) == [t for i, t in enumerate(texts) if i % 5 == 4]
    assert decoded(out, train_m) == [t for i, t in enumerate(texts) if i % 5 != 4]
    assert verify(out) == [] and verify(out / "valid") == []
    # A rerun finds both halves done; another split of the same output is refused.
    assert prepare_mod.prepare_split(inputs, out, 5, train_tokenizer_vocab=400, shard_tokens=1000,
                                     progress=False) == (train_m, valid_m)
    with pytest.raises(DataError, match="already holds"):
        prepare_mod.prepare_split(inputs, out, 4, train_tokenizer_vocab=400, shard_tokens=1000,
                                  progress=False)
