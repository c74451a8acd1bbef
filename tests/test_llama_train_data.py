"""SEED-LLaMA training data: exact to the original on the parity fixtures, our row layouts, the
restricted unpickler, the mixture and its resumable, rank-independent batches."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentencepiece")

from seed.errors import InputError  # noqa: E402
from seed.training.llm.data import (  # noqa: E402
    LlmData,
    LlmDataConfig,
    Source,
    list_files,
    load_plain_pickle,
    sources_from_config,
)
from seed.training.llm.format import (  # noqa: E402
    DIFFERENCE_RENAMES,
    EDIT_RESPONSE,
    FILTER_STRIP,
    FORMATTERS,
    GEN_PROMPT,
    GEN_RESPONSE,
    STORY_PROMPT,
    STORY_RESPONSE,
    Image,
    Plan,
    SampleEncoder,
    collate,
)

FIXTURES = Path(__file__).parent / "data" / "parity" / "llama_train"
FOLDERS = sorted(p for p in FIXTURES.iterdir() if (p / "spec.json").is_file())
TINY = FIXTURES / "llama-train-tiny"


_PT, _SFT = "src/data/torchdata_train.py:build_", "src/data/torchdata_sft.py:build_"
BUILDERS = {_PT + "caption_datapipes_for_llm": "caption", _PT + "mmc4_datapipes_for_llm": "mmc4",
            _PT + "video_caption_datapipes_for_llm": "video_caption", _PT + "text_pretrain_datapipes_for_llm": "text",
            _SFT + "qa_datapipes_for_llm": "sft_qa", _SFT + "conversation_datapipes_for_llm": "sft_conversation",
            _SFT + "visual_question_datapipes_for_llm": "sft_visual_question", _SFT + "edit_datapipes_for_llm": "sft_edit",
            _SFT + "difference_datapipes_for_llm": "sft_difference", _SFT + "story_datapipes_for_llm": "sft_story",
            _SFT + "video_datapipes_for_llm": "sft_video"}
"""The original's datapipe builders -> our formats (a fixture's ``pipelines[].builder``)."""


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "tokenizer")


@pytest.fixture(scope="module")
def llama_tok():
    return _tokenizer(TINY)


class ReplayDraws:
    """Replays the draws the original made (``samples.json`` ``draws``), checking their order and kind."""

    def __init__(self, draws: list, where: str):
        self.draws, self.where = list(draws), where

    def _next(self, fn: str, args: list):
        assert self.draws, f"{self.where}: a {fn}{args} draw the original did not make"
        got_fn, got_args, value = self.draws.pop(0)
        assert (got_fn, got_args) == (fn, args), f"{self.where}: drew {fn}{args}, the original drew {got_fn}{got_args}"
        return value

    def uniform(self):
        return self._next("np.random.uniform", [0, 1])

    def randint(self, a, b):
        return self._next("random.randint", [a, b])

    def choice(self, seq):
        return seq[self._next("random.choice", [len(seq)])]


def _padded(ids, labels, length):
    n = len(ids)
    return ids + [0] * (length - n), labels + [-100] * (length - n), [1] * n + [0] * (length - n)


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_formats_like_the_original(folder: Path):
    """Every sample of the fixture: ids, mask and labels exactly as the original made them, from
    the recorded decisions and from a replay of the recorded draws; drops and raises as the original."""
    tok = _tokenizer(folder)
    spec = json.loads((folder / "samples.json").read_text())
    t = spec["tokens"]
    assert len(tok) == t["len"]
    enc = SampleEncoder(tok)
    assert (enc.bos, enc.eos, enc.pad, enc.boi, enc.eoi) == (t["bos"], t["eos"], t["pad"], t["boi"], t["eoi"])
    expected = json.loads((folder / "expected_data.json").read_text())
    by_id = {e["id"]: e for e in expected["samples"]}
    raises = {e["id"] for e in expected["raises"]}
    checked = {"kept": 0, "dropped": 0, "raises": 0}
    for s in spec["samples"]:
        sid, kw = s["id"], {k: v for k, v in s["kwargs"].items() if k != "max_length"}
        length = s["kwargs"]["max_length"]
        fmt = FORMATTERS[s["kind"]]
        for how, call in (("decisions", lambda: fmt(s["payload"], None, decisions=s["decisions"], **kw)),
                          ("draws", lambda: fmt(s["payload"], ReplayDraws(s["draws"], sid), **kw))):
            if sid in raises:
                with pytest.raises(InputError):
                    call()
                checked["raises"] += how == "draws"
                continue
            plan = call()
            e = by_id[sid]
            if "input_ids" not in e or not e.get("kept_by_filter", True):
                assert plan is None, f"{sid}: the original drops this sample ({how})"
                checked["dropped"] += how == "draws"
                continue
            assert plan is not None, f"{sid}: dropped, the original keeps it ({how})"
            if how == "draws":
                assert plan.decisions == {k: v for k, v in s["decisions"].items()}, f"{sid}: decisions from the draws"
            ids, labels = enc.encode(plan, length)
            got = _padded(ids, labels, length)
            want = (e["input_ids"], e["labels"], e["attention_mask"])
            for name, g, w in zip(("input_ids", "labels", "attention_mask"), got, want):
                assert g == w, f"{sid} ({how}): {name} differ first at {next(i for i in range(length) if g[i] != w[i])}"
            checked["kept"] += how == "draws"
    assert checked["kept"] and checked["dropped"] and checked["raises"] == len(raises), checked

    # The pipeline runs over the fixture's tar shards: the same batches (files in order, no shuffle).
    kinds = dict(BUILDERS, **{f"{s['module']}:{s['builder']}": s["kind"] for s in spec["samples"]})
    for p in expected["pipelines"]:
        kw = dict(p["kwargs"])
        src = Source(name="shard", files=list_files(folder / p["shard"]), format=kinds[p["builder"]],
                     batch_size=kw.pop("batch_size"), max_length=kw.pop("max_length"), cycle=kw.pop("cycle_count"),
                     options=kw)
        data = LlmData([src], tok, seed=p["rng_seed"], shuffle=False)
        got = list(data)
        assert len(got) == len(p["batches"]), p["builder"]
        for g, w in zip(got, p["batches"]):
            for name in ("input_ids", "attention_mask", "labels"):
                assert g[name].tolist() == w[name], f"{p['builder']}: {name}"
        n = sum(len(b["input_ids"]) for b in p["batches"])
        assert data.counts()["shard"]["samples"] == n
        assert data.counts()["shard"]["dropped"] == len(p["samples_in_shard"]) - n


def test_templates_are_the_originals():
    t = json.loads((TINY / "templates.json").read_text())
    assert (t["gen_prompt"], t["gen_prompt_response"]) == (GEN_PROMPT, GEN_RESPONSE)
    assert t["edit_prompt_response"] == EDIT_RESPONSE
    assert (t["story_prompt"], t["story_prompt_response"]) == (STORY_PROMPT, STORY_RESPONSE)
    assert [tuple(x) for x in t["difference_renames"]] == DIFFERENCE_RENAMES
    assert t["caption_filter_strip_chars"] == FILTER_STRIP


# --------------------------------------------------------------------------- our row layouts


def _fixture_sample(sid: str) -> tuple[dict, dict]:
    spec = json.loads((TINY / "samples.json").read_text())
    expected = json.loads((TINY / "expected_data.json").read_text())
    s = next(x for x in spec["samples"] if x["id"] == sid)
    e = next(x for x in expected["samples"] if x["id"] == sid)
    return s, e


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _first(path, tok, fmt="auto", **kw):
    max_length = kw.pop("max_length")
    src = Source(name="s", files=list_files(path), format=fmt, batch_size=1, max_length=max_length, cycle=1,
                 options=kw)
    data = LlmData([src], tok, seed=0, shuffle=False)
    return next(data), data


def _assert_sample(batch, e):
    assert batch["input_ids"][0].tolist() == e["input_ids"]
    assert batch["labels"][0].tolist() == e["labels"]
    assert batch["attention_mask"][0].tolist() == e["attention_mask"]


def test_pair_parts_and_message_rows_give_the_originals_ids(tmp_path, llama_tok):
    """Our JSONL layouts map onto the original's formats: a pair is a caption pickle, parts an
    interleaved document, messages the SFT turns (the fixture's ids, from rows written our way)."""
    s, e = _fixture_sample("pt_caption_text_first")  # text first: reverse_ratio 0 never puts the image first
    row = {"codes": s["payload"]["image_ids"], "caption": s["payload"]["text"], "other": 1}
    batch, _ = _first(_write_jsonl(tmp_path / "pairs.jsonl", [row]), llama_tok, max_length=200, reverse_ratio=0.0)
    _assert_sample(batch, e)

    s, e = _fixture_sample("pt_obelisc")
    parts = [{"text": t} if t is not None else {"codes": c} for c, t in zip(s["payload"]["image_ids"], s["payload"]["texts"])]
    batch, _ = _first(_write_jsonl(tmp_path / "docs.jsonl", [{"parts": parts}]), llama_tok, max_length=1024,
                      reverse_ratio=0.0, max_images=7)
    _assert_sample(batch, e)

    s, e = _fixture_sample("sft_vq_turns")  # the original strips each turn and ends answers with "."
    codes = s["payload"]["image_ids"][0]
    messages = [{"role": "user", "content": [{"type": "image", "codes": codes}, {"type": "text", "text": "What is on the table?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A bowl of fruit."}]},
                {"role": "user", "content": "Which fruit is yellow?"},
                {"role": "assistant", "content": "The banana."}]
    batch, _ = _first(_write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), llama_tok, max_length=400)
    _assert_sample(batch, e)


def test_a_named_format_applies_to_pair_rows_and_caption_pickles(llama_tok):
    """With an explicit format the row's layout no longer picks the kind: a pair row in an sft_qa
    source is the original's caption-tool qa sample (the fixed describe question, the caption as
    the answer) on both branches; a caption pickle stays sft_qa (its answer branch raises, as the
    original's); a pair row in an sft_story source is a bad row, not a caption."""
    from seed.training.llm.data import ImageCodes, normalize_row
    from seed.training.llm.format import RandomDraws

    enc = SampleEncoder(llama_tok)
    for sid in ("sft_coco_answer", "sft_t2i"):  # answer branch (rr 0.5 drew it), generate branch (rr -1)
        s, e = _fixture_sample(sid)
        row = {"codes": s["payload"]["image_ids"], "caption": s["payload"]["answer"]}
        kind, payload = normalize_row(row, "sft_qa", RandomDraws(0), ImageCodes(), ".", sid)
        assert kind == "sft_qa" and payload["question"] == s["payload"]["question"]
        kw = {k: v for k, v in s["kwargs"].items() if k != "max_length"}
        plan = FORMATTERS[kind](payload, None, decisions=s["decisions"], **kw)
        got = _padded(*enc.encode(plan, s["kwargs"]["max_length"]), s["kwargs"]["max_length"])
        assert got == (e["input_ids"], e["labels"], e["attention_mask"]), sid
    pickle_row = {"image_ids": list(range(32)), "text": "A cat."}
    assert normalize_row(pickle_row, "sft_qa", RandomDraws(0), ImageCodes(), ".", "w") == ("sft_qa", pickle_row)
    assert normalize_row(pickle_row, "auto", RandomDraws(0), ImageCodes(), ".", "w")[0] == "caption"
    assert normalize_row({"text": "hi"}, "auto", RandomDraws(0), ImageCodes(), ".", "w")[0] == "text"
    kind, payload = normalize_row({"codes": list(range(32)), "question": "Q?", "answer": "a"}, "sft_qa",
                                  RandomDraws(0), ImageCodes(), ".", "w")
    assert kind == "sft_qa" and payload["image_ids"] == list(range(32)) and "codes" not in payload
    kind, payload = normalize_row({"codes": list(range(32)), "caption": "A dog."}, "sft_story", RandomDraws(0),
                                  ImageCodes(), ".", "w")
    assert kind == "sft_story"
    with pytest.raises(InputError, match="160"):
        FORMATTERS[kind](payload, None)


def test_tokenize_dataset_output_folder(tmp_path, llama_tok):
    """A tokenize_dataset.py output folder: codes/*.jsonl rows with the captions kept; errors/ ignored;
    rows with the image as text (--format text) read too."""
    s, e = _fixture_sample("pt_caption_text_first")
    out = tmp_path / "tok"
    (out / "run.json").parent.mkdir(parents=True)
    (out / "run.json").write_text("{}")
    codes, caption = s["payload"]["image_ids"], s["payload"]["text"]
    _write_jsonl(out / "codes" / "000000.jsonl", [{"image": "a.jpg", "codes": codes, "caption": caption}])
    _write_jsonl(out / "codes" / "000001.jsonl", [{"image": "b.jpg", "caption": caption,
                                                   "text": "<img>" + "".join(f"<img_{c:05d}>" for c in codes) + "</img>"}])
    _write_jsonl(out / "errors" / "000000.jsonl", [{"image": "c.jpg", "error": "cannot open"}])
    assert [Path(f).name for f in list_files(out)] == ["000000.jsonl", "000001.jsonl"]
    src = Source(name="tok", files=list_files(out), batch_size=1, max_length=200, cycle=1, options={"reverse_ratio": 0.0})
    batches = list(LlmData([src], llama_tok, seed=0, shuffle=False))
    assert len(batches) == 2
    for b in batches:
        _assert_sample(b, e)


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, llama_tok, caplog):
    good = {"codes": list(range(32)), "caption": "A dog."}
    rows = [good, "{not json", {"codes": list(range(31)), "caption": "x"}, {"codes": [9000] * 32, "caption": "x"},
            {"something": 1}, {"codes": list(range(32)), "caption": " ...; "}, [1, 2], "[" * 100000 + "]" * 100000, good]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    src = Source(name="mixed", files=[str(path)], batch_size=1, max_length=64, cycle=1)
    data = LlmData([src], llama_tok, seed=0, shuffle=False)
    with caplog.at_level("WARNING", logger="seed.training.llm.data"):
        assert len(list(data)) == 2
    assert data.counts()["mixed"] == {"rows": 9, "samples": 2, "dropped": 1, "bad": 6, "batches": 2, "passes": 1,
                                       "truncated": 0}
    text = caplog.text
    for why in ("not a JSON line", "31 codes", "codes must be in [0, 8192)", "cannot tell the kind", "must be a JSON object",
                "nested too deeply"):
        assert why in text, why
    assert "rows.jsonl:2" in text  # the row is named


# --------------------------------------------------------------------------- the original's tars


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_restricted_unpickler_refuses_code(tmp_path, llama_tok):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"image_ids": list(range(32)), "text": "x", "metadata": _Evil(marker)})
    with pytest.raises(InputError, match="os.mkdir|posix.mkdir"):
        load_plain_pickle(evil, "evil.pkl")
    assert not marker.exists()
    plain = {"image_ids": list(range(32)), "text": "A cat.", "metadata": {"s": 0.3, "ok": True, "t": (1, None)}}
    assert load_plain_pickle(pickle.dumps(plain)) == plain
    # In a shard: the bad member is skipped and counted, the others are used.
    shard = _tar(tmp_path / "0000000.tar", {"a.pkl": pickle.dumps(plain), "b.pkl": evil, "c.json": b"{}",
                                            "d.pkl": pickle.dumps(plain)})
    src = Source(name="tar", files=[str(shard)], format="caption", batch_size=2, max_length=64, cycle=1)
    data = LlmData([src], llama_tok, seed=0, shuffle=False)
    assert len(list(data)) == 1 and data.counts()["tar"]["bad"] == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- the mixture and its batches


def _mixture(tmp_path: Path, cycle=None) -> list[Source]:
    pairs = [{"codes": [(7 * i + k) % 8192 for k in range(32)], "caption": f"Caption number {i}."} for i in range(30)]
    chats = [{"messages": [{"role": "user", "content": [{"type": "image", "codes": [i] * 32}, "What is it?"]},
                           {"role": "assistant", "content": f"Thing {i}."}]} for i in range(10)]
    _write_jsonl(tmp_path / "a" / "1.jsonl", pairs[:15]), _write_jsonl(tmp_path / "a" / "2.jsonl", pairs[15:])
    b = _write_jsonl(tmp_path / "b.jsonl", chats)
    return [Source(name="pairs", files=list_files(tmp_path / "a"), weight=3.0, batch_size=4, max_length=48, cycle=cycle),
            Source(name="chat", files=[str(b)], weight=1.0, batch_size=2, max_length=64, cycle=cycle)]


def test_batches_do_not_depend_on_the_number_of_ranks(tmp_path, llama_tok):
    sources = _mixture(tmp_path)
    one = [next(d) for d in [LlmData(sources, llama_tok, seed=5)] for _ in range(12)]
    ranks = [LlmData(sources, llama_tok, seed=5, rank=r, world_size=2) for r in range(2)]
    two = [[next(d) for _ in range(12)] for d in ranks]
    assert {b["source"][0] for b in one} == {"pairs", "chat"}
    for k, b in enumerate(one):
        halves = [two[0][k], two[1][k]]
        assert [len(h["source"]) for h in halves] == [len(b["source"]) // 2] * 2
        assert b["input_ids"].shape[1] == {"pairs": 48, "chat": 64}[b["source"][0]]
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(torch.cat([h[name] for h in halves]), b[name]), (k, name)
        assert halves[0]["source"] + halves[1]["source"] == b["source"]
    assert ranks[0].counts() == ranks[1].counts()
    # Another seed gives another stream.
    other = [next(d) for d in [LlmData(sources, llama_tok, seed=6)] for _ in range(12)]
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, other) if x["source"] == y["source"])


def test_resume_continues_exactly(tmp_path, llama_tok):
    sources = _mixture(tmp_path)
    run = LlmData(sources, llama_tok, seed=1)
    full = [next(run) for _ in range(25)]  # 25 batches: several passes over both sources
    first = LlmData(sources, llama_tok, seed=1)
    for _ in range(11):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = LlmData(sources, llama_tok, seed=1)
    resumed.load_state_dict(state)
    assert resumed.counts() == first.counts()
    for k in range(11, 25):
        b = next(resumed)
        assert b["source"] == full[k]["source"] and torch.equal(b["input_ids"], full[k]["input_ids"]), k
        assert torch.equal(b["labels"], full[k]["labels"])
    assert resumed.counts() == run.counts()
    assert run.counts()["pairs"]["passes"] >= 1 and run.counts()["chat"]["passes"] >= 1
    with pytest.raises(InputError, match="seed"):
        LlmData(sources, llama_tok, seed=2).load_state_dict(state)
    with pytest.raises(InputError, match="sources"):
        LlmData(sources[:1], llama_tok, seed=1).load_state_dict(state)


def test_finite_sources_run_out(tmp_path, llama_tok):
    sources = _mixture(tmp_path, cycle=1)
    data = LlmData(sources, llama_tok, seed=0)
    batches = list(data)
    sizes = {name: [len(b["source"]) for b in batches if b["source"][0] == name] for name in ("pairs", "chat")}
    assert sizes == {"pairs": [4] * 7 + [2], "chat": [2] * 5}
    c = data.counts()
    assert (c["pairs"]["samples"], c["chat"]["samples"], c["pairs"]["passes"]) == (30, 10, 1)
    # Two ranks: the last short batch (2 samples) is split; with one sample it would be dropped.
    two = list(LlmData(sources, llama_tok, seed=0, rank=1, world_size=2))
    assert [len(b["source"]) for b in two if b["source"][0] == "pairs"] == [2] * 7 + [1]


def test_mixture_follows_the_weights(tmp_path, llama_tok):
    sources = _mixture(tmp_path)
    data = LlmData(sources, llama_tok, seed=0)
    names = [next(data)["source"][0] for _ in range(400)]
    assert 0.68 < names.count("pairs") / 400 < 0.82  # weight 3 : 1


def test_config_and_bad_settings(tmp_path, llama_tok):
    from seed.config import validate

    _mixture(tmp_path)
    cfg = validate([{"sources": [{"path": "a", "format": "caption", "weight": 2, "options": {"reverse_ratio": 0.0}},
                                 {"path": ["b.jsonl"], "name": "chat", "max_length": 64}],
                     "batch_size": 2, "max_length": 48}], LlmDataConfig)
    sources = sources_from_config(cfg, base_dir=tmp_path)
    assert [(s.name, s.format, s.weight, s.batch_size, s.max_length, len(s.files)) for s in sources] == \
        [("a", "caption", 2.0, 2, 48, 2), ("chat", "auto", 1.0, 2, 64, 1)]
    data = LlmData.from_config(cfg, llama_tok, seed=0, base_dir=tmp_path)
    assert next(data)["input_ids"].shape[0] == 2
    with pytest.raises(InputError, match="batchsize"):
        validate([{"batchsize": 2}], LlmDataConfig)
    with pytest.raises(InputError, match="does not exist"):
        sources_from_config({"train": "nope.jsonl"}, base_dir=tmp_path)
    with pytest.raises(InputError, match="unknown format"):
        Source(name="x", files=["f"], format="captions")
    with pytest.raises(InputError, match="divide"):
        LlmData(sources, llama_tok, world_size=4)
    bad_opts = Source(name="a", files=sources[0].files, format="caption", options={"max_images": 3})
    with pytest.raises(InputError, match="options"):
        next(LlmData([bad_opts], llama_tok))
    with pytest.raises(InputError, match=r"data.sources\[1\].path"):
        sources_from_config({"sources": [{"path": "a"}, {"path": 5}]}, base_dir=tmp_path)
    with pytest.raises(InputError, match="caption_prompt"):  # an option no row can use: the config, not a bad row
        next(LlmData([Source(name="a", files=sources[0].files, format="caption", options={"caption_prompt": "{1}"})],
                     llama_tok))
    all_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}] * 3)
    with pytest.raises(InputError, match="no usable sample"):
        next(LlmData([Source(name="bad", files=[str(all_bad)])], llama_tok))


def test_settings_mean_what_they_say(tmp_path, caplog):
    """weight 0 leaves a source out (not weight 1); a size of 0 is an error naming the key (not the default)."""
    _mixture(tmp_path)
    two = [{"path": "a", "name": "pairs"}, {"path": "b.jsonl", "name": "chat", "weight": 0}]
    with caplog.at_level("WARNING"):
        sources = sources_from_config({"sources": two, "batch_size": 2}, base_dir=tmp_path)
    assert [(s.name, s.weight) for s in sources] == [("pairs", 1.0)]
    assert "data.sources[1] (chat): weight 0, left out of the mixture" in caplog.text
    with pytest.raises(InputError, match=r"every source has weight 0"):
        sources_from_config({"sources": [dict(two[0], weight=0.0), two[1]]}, base_dir=tmp_path)
    for cfg, key in (({"train": "a", "batch_size": 0}, r"data.batch_size: must be an int >= 1, got 0"),
                     ({"train": "a", "max_length": 0}, r"data.max_length: must be an int >= 2 \(bos \+ eos\), got 0"),
                     ({"sources": [{"path": "a", "batch_size": 0}]}, r"data.sources\[0\].batch_size: must be"),
                     ({"sources": [{"path": "a", "max_length": 0}]}, r"data.sources\[0\].max_length: must be"),
                     ({"sources": [{"path": "a", "weight": -1}]}, r"data.sources\[0\].weight: must be a number >= 0"),
                     ({"sources": [{"path": "a", "cycle": 0}]}, r"data.sources\[0\].cycle: must be an int >= 1")):
        with pytest.raises(InputError, match=key):
            sources_from_config(cfg, base_dir=tmp_path)


def test_llama_config_checks_data_settings_before_anything_is_built():
    from seed.training.llm.config import load_llama_train_config

    pretrain = Path(__file__).resolve().parents[1] / "configs" / "train" / "llama_pretrain_tiny.yaml"
    for override, key in (("data.batch_size=0", "data.batch_size"), ("data.max_length=0", "data.max_length"),
                          ("data.sources=[{path: x, max_length: 0}]", r"data.sources\[0\].max_length")):
        with pytest.raises(InputError, match=key):
            load_llama_train_config(pretrain, override)


def test_text_the_tokenizer_cannot_encode_is_a_counted_bad_row(tmp_path, llama_tok, caplog, monkeypatch):
    """A lone surrogate (json.loads gives one for "\\ud83d") in a caption or a message: a bad row
    named by file and line, on every rank alike; the stream goes on and resumes past it."""
    pairs = [{"codes": [i] * 32, "caption": f"Caption number {i}."} for i in range(6)]
    pairs[2]["caption"] = "A smiling face \ud83d in the scraped caption."
    chat = {"messages": [{"role": "user", "content": "Hi \udc00 there"}, {"role": "assistant", "content": "Hello."}]}
    path = _write_jsonl(tmp_path / "scraped.jsonl", [*pairs, chat])
    assert "\\ud83d" in path.read_text()  # as json.dumps writes it
    src = Source(name="web", files=[str(path)], format="auto", batch_size=2, max_length=64, cycle=1)
    data = LlmData([src], llama_tok, seed=0, shuffle=False)
    with caplog.at_level("WARNING"):
        batches = list(data)
    assert [len(b["source"]) for b in batches] == [2, 2, 1]
    assert data.counts()["web"]["bad"] == 2 and data.counts()["web"]["samples"] == 5
    assert "web:scraped.jsonl:3" in caplog.text and "web:scraped.jsonl:7" in caplog.text
    assert "cannot encode" in caplog.text and "surrogates not allowed" in caplog.text
    # two ranks see the same bad rows and batches; a resume from before the bad row goes past it
    ranks = [LlmData([src], llama_tok, seed=0, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert [len(list(d)) for d in ranks] == [2, 2] and ranks[0].counts() == ranks[1].counts()  # the last 1 < 2 ranks
    first = LlmData([src], llama_tok, seed=0, shuffle=False)
    next(first)
    resumed = LlmData([src], llama_tok, seed=0, shuffle=False)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in batches[1:]]
    # any other tokenizer failure on a row: counted and logged where it happens, the batch keeps its size
    from seed.training.llm import format as F

    real = F.SampleEncoder.encode_parts

    def failing(self, parts):
        if any(isinstance(p, str) and "number 4" in p for p in parts):
            raise RuntimeError("the tokenizer choked")
        return real(self, parts)

    monkeypatch.setattr(F.SampleEncoder, "encode_parts", failing)
    caplog.clear()
    data = LlmData([src], llama_tok, seed=0, shuffle=False)
    got = list(data)
    assert [len(b["source"]) for b in got] == [2, 2, 1] and data.counts()["web"]["bad"] == 3
    assert "web:scraped.jsonl:5" in caplog.text and "the tokenizer choked" in caplog.text
    assert (got[1]["labels"][1] == -100).all() and got[1]["attention_mask"][1].sum() == 2


def test_image_paths_in_messages_are_tokenized_once(tmp_path, llama_tok):
    calls = []

    class FakeImageTokenizer:  # stands for seed.Tokenizer: encode(list of paths) -> int64 [B, 32]
        def encode(self, images):
            calls.append(list(images))
            return torch.arange(32).unsqueeze(0) + 100

    built = []
    (tmp_path / "cat.png").write_bytes(b"not read by the fake")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What?"}]},
                        {"role": "assistant", "content": "A cat."}]}
    path = _write_jsonl(tmp_path / "chat.jsonl", [row, row])
    src = Source(name="chat", files=[str(path)], batch_size=2, max_length=64, cycle=1)
    batch = next(LlmData([src], llama_tok, image_tokenizer=lambda: built.append(1) or FakeImageTokenizer()))
    assert len(calls) == 1 and len(built) == 1
    want = [{"type": "image", "codes": list(range(100, 132))}, {"type": "text", "text": "What?"}]
    ref = FORMATTERS["messages"]({"messages": [dict(row["messages"][0], content=want), row["messages"][1]]})
    ids, _ = SampleEncoder(llama_tok).encode(ref, 64)
    assert batch["input_ids"][0, :len(ids)].tolist() == ids
    # Without an image tokenizer the first such row stops the stream (not a skipped bad row): issue 22.
    data = LlmData([src], llama_tok)
    with pytest.raises(InputError, match=r"chat\.jsonl:1: image .*cat\.png.*data\.image_tokenizer"):
        next(data)
    assert data.counts()["chat"]["bad"] == 0


def test_image_tokenizer_is_named_as_seed_tokenizer_load_takes_it(tmp_path, monkeypatch):
    """data.image_tokenizer may be a config name (or YAML, folder, Hub id): it goes to Tokenizer.load."""
    import seed.tokenizer
    from seed.training.llm.data import ImageCodes

    asked = []

    class Fake:
        def encode(self, images):
            return torch.arange(32).unsqueeze(0)

    def load(spec, *overrides):
        asked.append(spec)
        return Fake()

    monkeypatch.setattr(seed.tokenizer.Tokenizer, "load", staticmethod(load))
    monkeypatch.setattr(seed.tokenizer.Tokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: pytest.fail("a config name is not a folder or Hub id")))
    (tmp_path / "a.png").write_bytes(b"not read by the fake")
    images = ImageCodes("seed2_tiny")
    assert images(str(tmp_path / "a.png")) == tuple(range(32)) and asked == ["seed2_tiny"]


def test_a_genuine_unk_is_masked_in_pretraining_only(llama_tok):
    """The original masks every pad id (= <unk>) in pretraining labels, also one the text holds, but
    keeps it in SFT answers (their labels are the answer ids); the attention mask covers it."""
    enc = SampleEncoder(llama_tok)
    pt = FORMATTERS["caption"]({"image_ids": list(range(32)), "text": "a <unk> b"}, decisions={"image_first": False})
    ids, labels = enc.encode(pt, 64)
    k = ids.index(0)
    assert labels[k] == -100 and labels[k - 1] == ids[k - 1]
    assert collate([(ids, labels)], 64)["attention_mask"][0, k] == 1
    sft = FORMATTERS["sft_qa"]({"image_ids": list(range(32)), "question": "Q?", "answer": "a <unk> b"})
    ids, labels = enc.encode(sft, 64)
    assert labels[ids.index(0)] == 0


def test_plans_are_checked(llama_tok):
    with pytest.raises(InputError, match="image_ids"):
        FORMATTERS["caption"]({"text": "x"}, decisions={"image_first": True})
    with pytest.raises(InputError, match="decision 'image_first'"):
        FORMATTERS["caption"]({"image_ids": list(range(32)), "text": "x"})
    with pytest.raises(InputError, match="assistant"):
        FORMATTERS["messages"]({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(InputError, match="alternate"):
        FORMATTERS["messages"]({"messages": [{"role": "assistant", "content": "hi"}]})
    # A literal <img></img> in the text: the image spans still land where they belong.
    enc = SampleEncoder(llama_tok)
    plan = Plan([(["see <img></img> here", Image(tuple(range(32))), "end"], True)], one_string=True)
    ids, _ = enc.encode(plan, 128)
    boi, eoi = enc.boi, enc.eoi
    assert ids[ids.index(boi):ids.index(eoi) + 1] == [boi, eoi]  # the literal one stays empty
    second = ids.index(boi, ids.index(eoi))
    assert ids[second + 1:second + 33] == [enc.code_offset + c for c in range(32)] and ids[second + 33] == eoi


def test_pad_to_longest_keeps_every_id_and_label(tmp_path, llama_tok):
    sources = _mixture(tmp_path)
    full = LlmData(sources, llama_tok, seed=3)
    short = LlmData(sources, llama_tok, seed=3, pad_to="longest")
    shorter = 0
    for _ in range(6):
        a, b = next(full), next(short)
        n = b["input_ids"].shape[1]
        assert n == int(a["attention_mask"].sum(1).max())
        shorter += n < a["input_ids"].shape[1]
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[name][:, :n], b[name])
        assert (a["labels"][:, n:] == -100).all()
    assert shorter


def test_resume_refuses_other_files(tmp_path, llama_tok):
    sources = _mixture(tmp_path)
    data = LlmData(sources, llama_tok, seed=0)
    next(data)
    state = data.state_dict()
    fewer = [Source(name="pairs", files=sources[0].files[:1], batch_size=4, max_length=48), sources[1]]
    with pytest.raises(InputError, match="files differ"):
        LlmData(fewer, llama_tok, seed=0).load_state_dict(state)


def test_messages_follow_the_original_sft_layout(llama_tok):
    """System text + "\\n" and the USER/ASSISTANT prompts unlearned, each encoded on its own as the
    original's SFT functions do; the assistant contents and the final </s> learned."""
    from seed.llm import encode_text

    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "image", "codes": [5] * 32}, "What is it?"]},
                        {"role": "assistant", "content": "A dog."},
                        {"role": "user", "content": "Color?"},
                        {"role": "assistant", "content": [{"type": "text", "text": "Brown."}]}]}
    enc = SampleEncoder(llama_tok)
    ids, labels = enc.encode(FORMATTERS["messages"](row), 256)
    image = "<img>" + "<img_00005>" * 32 + "</img>"
    pieces = [("Be brief.\n", False), ("USER: " + image + "What is it?\nASSISTANT:", False), ("A dog.", True),
              ("\nUSER: Color?\nASSISTANT:", False), ("Brown.", True)]
    want_ids, want_labels = [1], [-100]
    for text, learned in pieces:
        seg = encode_text(llama_tok, text)
        want_ids += seg
        want_labels += seg if learned else [-100] * len(seg)
    assert (ids, labels) == (want_ids + [2], want_labels + [2])
