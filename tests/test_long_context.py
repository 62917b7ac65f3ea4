"""The long-context stage end to end, CPU-sized: `hymoe train tiny` (pretraining, a few steps),
then `hymoe train tiny_long_context` from its checkpoint (2k rows here instead of the recipe's 16k:
the 16k attention scores alone take gigabytes on CPU) — it reports what it loaded and what it
changed, trains with finite losses from the pretrained level (not from ln(vocab)) — then
`hymoe eval passkey` and `hymoe eval position-loss` on the stage's checkpoint, checked against an
independent computation in this process. Plus the stage recipes themselves (published numbers)
and the pieces of `hymoe.train.stage`."""

import json
import math

import pytest
import torch
from helpers import hymoe, hymoe_torchrun

from hymoe.train import checkpoint as ckpt
from hymoe.train.config import validate
from hymoe.train.recipe import load_recipe

QUIET = ["logging.progress=false", "logging.wandb=disabled"]
PRE_STEPS = 30
STAGE_LEN = 2048


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    pre, stage = root / "pre", root / "stage"
    r = hymoe("train", "tiny", *QUIET, f"train.steps={PRE_STEPS}", "optim.warmup_steps=2",
              "optim.lr=1e-2", "train.global_batch=4", "train.micro_batch=4", "train.seq_len=128",
              f"run.dir={pre}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # The stage recipe as it is, but shorter: 3 steps of 2 rows of 2048 tokens; short rows cut into
    # 512-token contexts so that the long/short mix has cuts inside a row.
    r = hymoe("train", "tiny_long_context", *QUIET, "train.steps=3", f"train.seq_len={STAGE_LEN}",
              "data.datasets.short.context_len=512", f"checkpoint.init_weights={pre}",
              f"run.dir={stage}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return pre, stage, r.stdout


def test_stage_reports_what_it_loaded_and_changed(chain):
    pre, stage, out = chain
    step_dir = pre / "checkpoints" / f"step_{PRE_STEPS:08d}"
    tokens = PRE_STEPS * 4 * 128
    assert (f"initialised the model weights from {step_dir} (step {PRE_STEPS}, {tokens:,} tokens, "
            "recipe tiny)") in out
    assert f"changed against {pre / 'config.yaml'}:" in out
    for line in ("  recipe: tiny → tiny_long_context", f"  train.seq_len: 128 → {STAGE_LEN}",
                 "  optim.schedule: wsd → constant", "  optim.warmup_steps: 2 → 0",
                 "  train.document_masks: false → true", "  model.loss_chunk_tokens: 0 → 4096",
                 "  data.datasets.short.context_len: (unset) → 512",
                 f"  checkpoint.init_weights: null → {pre}"):
        assert line in out.splitlines(), line
    report = json.loads((stage / "stage.json").read_text())
    assert report["checkpoint"] == str(step_dir) and report["tokens"] == tokens
    keys = {c["key"] for c in report["changed"]}
    assert "run.dir" not in keys and "model.pattern" not in keys and "train.micro_batch" in keys


@pytest.mark.distributed
def test_stage_at_16k_with_cp2_matches_cp1(chain, demo_data, tmp_path):
    """The stage recipe at its own 16k tokens, packed documents, long and 2k-context rows: context
    parallelism over 2 ranks (attention K/V exchange, Mamba all-to-all, per-rank chunked loss)
    trains to the same losses and grad norms as one rank."""
    pre = chain[0]
    common = [*QUIET, "train.steps=2", "train.global_batch=1", "train.micro_batch=1",
              "checkpoint.save_final=false", f"checkpoint.init_weights={pre}", f"data.path={demo_data}"]
    runs = {1: tmp_path / "cp1", 2: tmp_path / "cp2"}
    r = hymoe("train", "tiny_long_context", *common, f"run.dir={runs[1]}", timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = hymoe_torchrun(2, "train", "tiny_long_context", *common, "parallel.cp=2",
                       f"run.dir={runs[2]}", timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one, two = metrics(runs[1]), metrics(runs[2])
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two] == [16384, 32768]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_stage_trains_from_the_pretrained_weights(chain, demo_data):
    pre, stage, _ = chain
    before, after = metrics(pre), metrics(stage)
    assert [m["step"] for m in after] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in after)
    assert all(m["lr"] == pytest.approx(3e-4) for m in after)  # constant, no warmup
    assert after[0]["tokens"] == 2 * STAGE_LEN  # the stage counts its own tokens from 0
    vocab = json.loads((demo_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    # A fresh model starts at ~ln(vocab) = 6.24; the pretrained one where pretraining ended.
    assert after[0]["loss"] < math.log(vocab) - 1.0, after[0]["loss"]
    assert abs(after[0]["loss"] - before[-1]["loss"]) < 1.0, (after[0]["loss"], before[-1]["loss"])
    assert (stage / "checkpoints" / "latest").read_text() == "step_00000003"


def test_stage_with_optimizer_state(chain, demo_data, tmp_path):
    """checkpoint.init_optimizer: Adam moments come along (another layout of the batch and
    sequence); the stage's own LR applies from its first step."""
    pre, _, _ = chain
    run = tmp_path / "opt"
    r = hymoe("train", "tiny_long_context", *QUIET, "train.steps=1", "train.seq_len=256",
              "checkpoint.init_optimizer=true", "optim.lr=1e-3", "optim.min_lr=1e-3",
              "checkpoint.save_final=false", f"checkpoint.init_weights={pre}", f"run.dir={run}",
              f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded: model weights and optimizer state" in r.stdout
    m = metrics(run)
    assert m[0]["lr"] == pytest.approx(1e-3) and math.isfinite(m[0]["loss"])


def test_eval_passkey_cli(chain, tmp_path):
    _, stage, _ = chain
    out = tmp_path / "pk"
    r = hymoe("eval", "passkey", str(stage), "--lengths", "256,1k", "--depths", "0,1",
              "--trials", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "passkey.json").read_text())
    assert res["lengths"] == [256, 1024] and res["step"] == 3
    assert {(c["length"], c["depth"]) for c in res["cells"]} == {(256, 0.0), (256, 1.0), (1024, 0.0), (1024, 1.0)}
    assert len(res["trials_detail"]) == 8 and all(0 <= c["accuracy"] <= 1 for c in res["cells"])
    for t in res["trials_detail"]:
        assert len(t["key"]) == 5 and t["logprob"] < 0 and t["exact"] == (t["token_accuracy"] == 1.0)
    assert (out / "passkey.png").stat().st_size > 0 and "accuracy" in r.stdout


def test_passkey_prompt_layout(demo_data):
    from hymoe.data import load_tokenizer
    from hymoe.train.eval_passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION, build_prompt

    tok = load_tokenizer(demo_data)

    def n(text):
        return len(tok.encode(text).ids)

    head, sentence = n(INSTRUCTION), n(FILLER)
    needle, tail = n(NEEDLE.format(key="48213")), n(QUESTION) + n(" 48213")
    for length in (300, 1000):
        room = length - head - needle - tail  # filler tokens
        at = {d: build_prompt(tok, length, d, "48213") for d in (0.0, 0.5, 1.0)}
        for p in at.values():
            assert len(p.tokens) == length and p.tokens[-len(p.answer):] == p.answer
            text = tok.decode(p.tokens)
            assert text.count("48213") == 3 and text.endswith("The pass key is 48213")
            assert (p.needle_at - head) % sentence == 0  # at a sentence boundary
        assert at[0.0].needle_at == head  # right after the instructions
        assert abs(at[0.5].needle_at - head - room / 2) <= sentence
        after = length - tail - at[1.0].needle_at - needle  # filler between needle and question
        assert 0 <= after < sentence
    with pytest.raises(ValueError, match="no room for filler"):
        build_prompt(tok, 40, 0.5, "48213")


def test_passkey_score_is_greedy_decoding(chain, demo_data):
    """The one-pass score equals greedy generation token by token: with the model's own greedy
    continuation planted as the answer it must count as retrieved; one token off, not."""
    from hymoe.data import load_tokenizer
    from hymoe.train.eval_model import load_model
    from hymoe.train.eval_passkey import Prompt, build_prompt, score

    _, stage, _ = chain
    model, meta, _ = load_model(stage)
    tok = load_tokenizer(demo_data)
    p = build_prompt(tok, 400, 0.5, "90417")
    prefix = p.tokens[: -len(p.answer)]
    greedy = []
    with torch.no_grad():
        for _ in range(3):  # plain decoding: full forward, full logits, argmax of the last position
            logits = model(torch.tensor([prefix + greedy]), None, None)
            greedy.append(int(logits[0, -1].argmax()))
    planted = Prompt(prefix + greedy, greedy, "", p.needle_at)
    r = score(model, planted)
    assert r["exact"] and r["predicted"] == greedy and r["token_accuracy"] == 1.0
    wrong = greedy[:2] + [(greedy[2] + 1) % meta["vocab_size"]]
    r = score(model, Prompt(prefix + wrong, wrong, "", p.needle_at))
    assert not r["exact"] and r["token_accuracy"] == pytest.approx(2 / 3)


def test_eval_position_loss_cli_matches_full_logits(chain, demo_data, tmp_path):
    from hymoe.train.eval_model import load_model
    from hymoe.train.eval_position import long_documents

    _, stage, _ = chain
    out = tmp_path / "pl"
    r = hymoe("eval", "position-loss", str(stage / "checkpoints"), "--data", str(demo_data),
              "--length", "512", "--docs", "3", "--bins", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "position_loss.json").read_text())
    assert res["sequences"] == 3 and res["length"] == 512
    assert [(b["start"], b["end"]) for b in res["bins"]] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert res["cumulative"][-1]["mean_nll"] == pytest.approx(res["mean_nll"], rel=1e-9)
    assert (out / "position_loss.png").stat().st_size > 0
    # Independently: the same documents, megatron's unchunked loss over full logits.
    model, _, _ = load_model(stage)
    model.config.hymoe_loss_chunk_tokens = 0
    docs = long_documents(demo_data, 512, 3)
    nll = []
    with torch.no_grad():
        for d in docs:
            t = torch.as_tensor(d)[None]
            logits = model(t[:, :-1], None, None)[0]
            nll.append(torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="none"))
    nll = torch.stack(nll).mean(0)
    assert res["mean_nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert res["bins"][1]["mean_nll"] == pytest.approx(float(nll[128:256].mean()), rel=1e-5)


def test_eval_loads_converted_weights(chain, tmp_path):
    """`hymoe convert from-hf` output (model.yaml, no hymoe.json) evaluates like the checkpoint it
    came from: same per-token losses."""
    from hymoe.train import convert
    from hymoe.train.eval_model import load_model

    _, stage, _ = chain
    convert.to_hf(str(stage / "checkpoints"), str(tmp_path / "hf"), "fp32")
    back = convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    a, meta_a, _ = load_model(stage)
    b, meta_b, _ = load_model(back)
    assert meta_b["step"] is None and meta_b["vocab_size"] == meta_a["vocab_size"]
    t = torch.randint(2, 500, (1, 129), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = a(t[:, :-1], None, None, labels=t[:, 1:])
        lb = b(t[:, :-1], None, None, labels=t[:, 1:])
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)


def test_eval_errors_are_one_line(chain, demo_data, capsys):
    from hymoe.train.eval_cli import cmd_eval

    _, stage, _ = chain
    with pytest.raises(SystemExit) as e:
        cmd_eval(["passkey", str(stage), "--lengths", "4q"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("hymoe: error:") and "4q" in err
    with pytest.raises(SystemExit) as e:  # no demo document has 1M tokens
        cmd_eval(["position-loss", str(stage), "--data", str(demo_data), "--length", "1M"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "--length" in err and len(err.splitlines()) == 1, err


# -- the stage recipes ---------------------------------------------------------------------------
def test_tiny_long_context_recipe():
    cfg = load_recipe("tiny_long_context", [])
    validate(cfg, 1)
    t = cfg.train
    assert (t.seq_len, t.micro_batch, t.document_masks) == (16384, 1, True)
    assert cfg.optim.schedule == "constant" and cfg.optim.warmup_steps == 0
    assert cfg.model.max_sequence_length >= t.seq_len and cfg.model.loss_chunk_tokens > 0
    assert cfg.model.pattern == load_recipe("tiny", []).model.pattern
    assert cfg.data.datasets["short"].context_len == 2048 and cfg.data.datasets["long"].context_len is None
    assert cfg.checkpoint.init_weights == "runs/tiny"


@pytest.mark.parametrize("recipe, seq_len, tokens, layout", [
    ("nano_30b_a3b_long_context", 524_288, 121e9, (8, 8, 4, 8)),
    ("nano_30b_a3b_long_context_1m", 1_048_576, 34e9, (4, 16, 4, 8)),
])
def test_nano_long_context_recipes(recipe, seq_len, tokens, layout):
    cfg = load_recipe(recipe, [])
    p = cfg.parallel
    assert (p.tp, p.cp, p.pp, p.ep) == layout
    world = p.tp * p.cp * p.pp * 4  # dp = 4
    assert validate(cfg, world) == 4
    t = cfg.train
    assert t.seq_len == seq_len and abs(t.steps * t.global_batch * t.seq_len / tokens - 1) < 1e-3
    # As many tokens per step as pretraining (3072 × 8192).
    assert t.global_batch * t.seq_len == 3072 * 8192
    assert (cfg.optim.schedule, cfg.optim.lr, cfg.optim.warmup_steps) == ("constant", 1e-5, 0)
    assert cfg.data.datasets["short"].context_len == 4096 and t.document_masks
    assert t.recompute == "selective" and "moe" in t.recompute_modules
    pre = load_recipe("nano_30b_a3b", [])
    assert cfg.model.pattern == pre.model.pattern and cfg.precision == pre.precision
    assert cfg.model.loss_chunk_tokens > 0


# -- hymoe.train.stage ---------------------------------------------------------------------------
def test_config_diff():
    from hymoe.train.stage import UNSET, config_diff

    old = {"run": {"dir": "a"}, "train": {"seq_len": 64, "x": 1}, "data": {"datasets": {}}}
    new = {"run": {"dir": "b"}, "train": {"seq_len": 2048, "x": 1},
           "data": {"datasets": {"long": {"path": "."}}}}
    assert config_diff(old, new) == [("train.seq_len", 64, 2048), ("data.datasets.long.path", UNSET, ".")]


def test_find_checkpoint_forms(tmp_path):
    from hymoe.train.stage import find_checkpoint

    def fake(run, step):
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "hymoe.json").write_text("{}")
        (run / "checkpoints" / "latest").write_text(d.name)
        return d

    old = fake(tmp_path / "runs" / "2026-01-01_00-00-00", 5)
    new = fake(tmp_path / "runs" / "2026-02-01_00-00-00", 7)
    (tmp_path / "runs" / "2026-03-01_00-00-00").mkdir()  # a run without a checkpoint
    assert find_checkpoint(new) == new
    assert find_checkpoint(new.parent) == new and find_checkpoint(new.parent.parent) == new
    assert find_checkpoint(old.parent.parent) == old
    assert find_checkpoint(tmp_path / "runs") == new  # the newest run that has one
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint there"):
        find_checkpoint(tmp_path / "nothing")


def test_stage_refuses_another_architecture(tmp_path):
    from hymoe.train.stage import _check_architecture

    cfg = load_recipe("tiny_long_context", [])
    meta = {"model": {"pattern": cfg.model.pattern, "hidden_size": 32}, "vocab_size": 512}
    with pytest.raises(ckpt.CheckpointError, match=r"^model\.hidden_size: .*=32.* 64"):
        _check_architecture(meta, cfg, 512, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"^model\.vocab_size"):
        _check_architecture({"model": {}, "vocab_size": 512}, cfg, 1024, tmp_path)


def test_parse_length():
    from hymoe.train.eval_model import parse_length

    assert [parse_length(x) for x in ("4k", "16K", "1M", "3000")] == [4096, 16384, 1 << 20, 3000]
    with pytest.raises(ValueError):
        parse_length("4q")
