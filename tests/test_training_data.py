"""Training data: caption cleaning, the original augmentation, JSONL / tar sources, bad data,
the distributed batch order and its resumable position, and the training config schema."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import seed
from conftest import PHOTOS, fixtures
from seed.training.config import load_train_config
from seed.training.data import (EndlessBatches, PairDataset, Position, TrainTransform, build_loader, clean_caption,
                                read_pairs)

TRAINING = fixtures("training")


# --- captions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", TRAINING, ids=[p.name for p in TRAINING])
def test_caption_cleaning_matches_the_original(fixture):
    """The fixture's captions were processed by the original BlipCaptionProcessor."""
    batch = torch.load(fixture / "expected.pt", weights_only=True)["batch"]
    assert [clean_caption(c) for c in batch["captions_raw"]] == batch["captions"]


@pytest.mark.parametrize("raw, clean", [
    ("Hello World", "hello world"),
    ('A "quoted" (word): yes; no~ *star* #tag!', "a quoted word yes no star tag"),
    ("Dots...and   spaces\t\there.\n", "dots and spaces here"),
    ("It's a well-known dog, isn't it?", "it's a well-known dog, isn't it?"),  # , ' - ? stay
    ("  padded  ", "padded"),
])
def test_caption_cleaning_rules(raw, clean):
    assert clean_caption(raw) == clean


def test_caption_is_cut_to_max_words():
    words = [f"w{i}" for i in range(60)]
    assert clean_caption(" ".join(words)) == " ".join(words[:50])
    assert clean_caption(" ".join(words), max_words=3) == "w0 w1 w2"


# --- augmentation -------------------------------------------------------------------------------

def test_transform_is_the_original_pipeline():
    """torchvision's RandomResizedCrop(bicubic, scale .5-1, ratio 3/4-4/3), flip, ToTensor, CLIP
    Normalize, as LAVIS blip2_image_train; draws from the sample's seed only; both flips occur."""
    mine = TrainTransform(56, min_scale=0.5)
    crop, flip = mine.pipeline.transforms[:2]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (56, 56) and crop.scale == (0.5, 1.0)
    assert crop.ratio == (3 / 4, 4 / 3) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in TrainTransform(56, flip=False).pipeline.transforms)
    img = Image.open(PHOTOS[1]).convert("RGB")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    outs = [mine(img, s) for s in range(12)]
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must be left as it was"
    assert all(o.dtype == torch.float32 and o.shape == (3, 56, 56) for o in outs)
    assert all(torch.equal(mine(img, s), outs[s]) for s in (0, 5, 11))  # a seed gives its sample again
    assert len({o.sum().item() for o in outs}) == 12  # and different seeds, different crops
    whole = TrainTransform(56, min_scale=1.0)  # scale 1 on a square image: the crop is always the whole image
    square = img.resize((80, 80))
    outs = {tuple(whole(square, s).flatten()[:64].tolist()) for s in range(16)}
    assert len(outs) == 2  # so the outputs differ only by the flip, and both flips occur


# --- sources ------------------------------------------------------------------------------------

def _jsonl(tmp_path, rows):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_jsonl_paths_relative_to_the_file_and_caption_lists(tmp_path):
    (tmp_path / "img").mkdir()
    shutil.copy(PHOTOS[0], tmp_path / "img" / "a.png")
    p = _jsonl(tmp_path, [{"image": "img/a.png", "caption": "one"},
                          {"image": str(PHOTOS[1]), "caption": ["two", "deux"]}])
    pairs = read_pairs(p)
    assert [q.path for q in pairs] == [str(tmp_path / "img" / "a.png"), str(PHOTOS[1])]
    assert [q.captions for q in pairs] == [("one",), ("two", "deux")]
    assert pairs[0].open().size == Image.open(PHOTOS[0]).size


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    p = _jsonl(tmp_path, [{"image": str(PHOTOS[0]), "caption": "ok"}, "{not json", {"image": "x.png"},
                          {"caption": "no image"}, {"image": "y.png", "caption": []}])
    with caplog.at_level("WARNING"):
        pairs = read_pairs(p)
    assert len(pairs) == 1
    assert "4 malformed row(s) skipped" in caplog.text and "line 2" in caplog.text


def test_no_pairs_is_an_input_error(tmp_path):
    with pytest.raises(seed.InputError, match="no image-caption pairs"):
        read_pairs(_jsonl(tmp_path, ["{bad"]))
    with pytest.raises(seed.InputError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_shards_txt_and_json_captions(tmp_path, caplog):
    png = [p.read_bytes() for p in PHOTOS]
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    _tar(shards / "a.tar", [("k0.png", png[0]), ("k0.txt", b"A cat.\n"), ("k1.png", png[1]),
                            ("k1.json", json.dumps({"caption": ["x", "y"], "url": "u"}).encode()),
                            ("orphan.txt", b"no image")])
    _tar(shards / "sub" / "b.tar", [("d/k2.seg.png", png[0]), ("d/k2.png", png[2]), ("d/k2.json", b'"plain string"')])
    with caplog.at_level("WARNING"):
        pairs = read_pairs(shards)
    assert [(q.id, q.captions) for q in pairs] == [
        ("a.tar/k0.png", ("A cat.",)), ("a.tar/k1.png", ("x", "y")), ("sub/b.tar/d/k2.png", ("plain string",))]
    assert "orphan" in caplog.text and "1 malformed" in caplog.text
    for q, src in zip(pairs, PHOTOS):  # members are read by offset, exactly the file's bytes
        assert np.array_equal(np.asarray(q.open()), np.asarray(Image.open(src).convert("RGB")))
    assert [q.id for q in read_pairs(shards / "a.tar")] == ["a.tar/k0.png", "a.tar/k1.png"]


def test_bad_image_is_skipped_replaced_and_reported(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": str(PHOTOS[0]), "caption": "a"}, {"image": "missing.png", "caption": "b"},
            {"image": "broken.png", "caption": "c"}, {"image": str(PHOTOS[2]), "caption": "d"}]
    ds = PairDataset(read_pairs(_jsonl(tmp_path, rows)), TrainTransform(28))
    item = ds[(0, 1)]
    assert item["caption"] == "d"  # the next good pair takes the place of the two bad ones
    assert [i for i, _ in item["skipped"]] == ["missing.png", "broken.png"]
    assert "no such file" in item["skipped"][0][1] and "broken.png" in item["skipped"][1][1]
    assert ds[(0, 0)]["skipped"] == []


def test_sample_randomness_depends_on_epoch_and_index_only(tmp_path):
    p = _jsonl(tmp_path, [{"image": str(PHOTOS[0]), "caption": ["first", "second"]}])
    ds = PairDataset(read_pairs(p), TrainTransform(28), seed=7)
    a, b = ds[(3, 0)], ds[(3, 0)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    crops = {ds[(e, 0)]["pixel_values"].sum().item() for e in range(6)}
    captions = {ds[(e, 0)]["caption"] for e in range(20)}
    assert len(crops) == 6 and captions == {"first", "second"}
    other = PairDataset(ds.pairs, TrainTransform(28), seed=8)
    assert not torch.equal(other[(3, 0)]["pixel_values"], a["pixel_values"])


# --- order and position -------------------------------------------------------------------------

def _take(it, n):
    return [next(it) for _ in range(n)]


def test_each_epoch_is_a_permutation_with_the_tail_dropped():
    sampler = EndlessBatches(11, batch_size=2, rank=0, world_size=2, seed=1)
    assert sampler.batches_per_epoch == 2
    it = iter(sampler)
    for epoch in range(3):
        batches = _take(it, 2)
        assert {e for b in batches for e, _ in b} == {epoch}
    ranks = [_take(iter(EndlessBatches(11, 2, r, 2, seed=1)), 2) for r in range(2)]
    seen = [i for r in ranks for b in r for _, i in b]
    assert len(seen) == len(set(seen)) == 8  # 11 pairs: 2 global batches of 4, 3 dropped


def test_global_batch_is_the_same_for_any_world_size():
    one = _take(iter(EndlessBatches(10, batch_size=4, rank=0, world_size=1, seed=3)), 6)
    two = [_take(iter(EndlessBatches(10, batch_size=2, rank=r, world_size=2, seed=3)), 6) for r in range(2)]
    four = [_take(iter(EndlessBatches(10, batch_size=1, rank=r, world_size=4, seed=3)), 6) for r in range(4)]
    for k in range(6):
        assert one[k] == two[0][k] + two[1][k] == sum((four[r][k] for r in range(4)), [])


def test_resume_from_a_position_continues_the_same_stream():
    full = _take(iter(EndlessBatches(9, 2, 1, 2, seed=5)), 7)
    pos = Position()
    for _ in range(4):
        pos = pos.advanced(2)
    assert pos == Position(2, 0)
    assert _take(iter(EndlessBatches(9, 2, 1, 2, seed=5, start=pos)), 3) == full[4:]
    assert _take(iter(EndlessBatches(9, 2, 1, 2, seed=5, start=Position(1, 1))), 4) == full[3:]


def test_fewer_pairs_than_one_global_batch_is_an_error():
    with pytest.raises(seed.InputError, match="fewer than one global batch"):
        EndlessBatches(3, batch_size=2, world_size=2)


def test_loader_batches_are_identical_with_workers_and_after_resume(tmp_path):
    rows = [{"image": str(p), "caption": [f"{p.stem} one", f"{p.stem} two"]} for p in PHOTOS] * 2
    pairs = read_pairs(_jsonl(tmp_path, rows))
    kw = dict(image_size=28, batch_size=2, seed=11)
    loader, per_epoch = build_loader(pairs, **kw)
    assert per_epoch == 3
    ref = _take(iter(loader), 5)
    assert ref[0]["pixel_values"].shape == (2, 3, 28, 28) and len(ref[0]["captions"]) == 2
    workers, _ = build_loader(pairs, num_workers=2, **kw)
    resumed, _ = build_loader(pairs, start=Position(1, 0), **kw)
    for a, b in zip(ref, _take(iter(workers), 5)):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]
    for a, b in zip(ref[3:], _take(iter(resumed), 2)):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]


# --- config -------------------------------------------------------------------------------------

def test_training_configs_validate():
    for name in ("seed1_stage1", "seed1_stage2", "seed2_stage2", "seed1_stage1_tiny", "seed1_stage2_tiny",
                 "seed2_stage2_tiny"):
        cfg = load_train_config(f"configs/train/{name}.yaml")
        assert cfg.stage == (1 if "stage1" in name else 2)
    real = load_train_config("configs/train/seed1_stage2.yaml")
    assert (real.train.init_lr, real.train.min_lr, real.train.warmup_lr, real.data.batch_size) == (1e-4, 1e-5, 1e-6, 256)


def test_config_errors_name_the_key():
    with pytest.raises(seed.InputError, match=r"train\.save_evry.*train\.save_every"):
        load_train_config("configs/train/seed1_stage2_tiny.yaml", "train.save_evry=3")
    with pytest.raises(seed.InputError, match="train.max_steps"):
        load_train_config("configs/train/seed1_stage2_tiny.yaml", "train.max_steps=many")
    with pytest.raises(seed.InputError, match="train.precision"):
        load_train_config("configs/train/seed1_stage2_tiny.yaml", "train.precision=fp8")


def test_jsonl_captions_may_hold_any_unicode_and_the_file_a_bom(tmp_path):
    """Rows are split at newlines only (U+2028, U+0085 in a caption are text, as json.dumps writes them
    with ensure_ascii=False), and a UTF-8 BOM is not part of the first row."""
    from seed.training.data import read_pairs

    rows = [{"image": str(PHOTOS[0]), "caption": "a man\u2028with a camera"},
            {"image": str(PHOTOS[1]), "caption": "a cat\x85 sitting"},
            {"image": str(PHOTOS[2]), "caption": "coffee\u2029cup"}]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    pairs = read_pairs(path)
    assert len(pairs) == 3
    assert [p.captions for p in pairs] == [(r["caption"],) for r in rows]
