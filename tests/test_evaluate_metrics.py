"""Known-answer tests of the evaluation metrics (seed.evaluation.metrics) on small real inputs.

Expected values come from hand computations shown here or the official definitions' published
values (VQA: 1/2/3 matching humans -> 0.3/0.6/0.9), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import PHOTOS, TinyFeatures
from PIL import Image
from torch import nn

from seed import InputError
from seed.evaluation import metrics as M


# --- retrieval ------------------------------------------------------------------------------------

def test_recall_at_k_on_a_constructed_matrix():
    # 3 images, 5 captions; caption j belongs to image owner[j]
    owner = [0, 0, 1, 2, 2]
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.3],
        [0.5, 0.6, 0.4, 0.7, 0.1],
        [0.2, 0.3, 0.1, 0.25, 0.0],
    ])
    r = M.recall_at_k(sim, owner, ks=(1, 2, 5))
    # rows: image 0's best own text (0: 0.9) is first: rank 0; image 1's own text 2 (0.4) has 0.5, 0.6,
    # 0.7 above it: rank 3; image 2's best own text 3 (0.25) has 0.3 above it: rank 1
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3) and r["i2t_R@5"] == 1
    # columns: text 0 (image 0: 0.9) rank 0; text 1 (image 0: 0.1; 0.6, 0.3 above) rank 2; text 2
    # (image 1: 0.4; 0.8 above) rank 1; text 3 (image 2: 0.25; 0.7 above) rank 1; text 4 (image 2: 0.0) rank 2
    assert r["t2i_R@1"] == pytest.approx(1 / 5) and r["t2i_R@2"] == pytest.approx(3 / 5) and r["t2i_R@5"] == 1
    assert r["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 5 + 3 / 5 + 1) / 6)
    with pytest.raises(InputError, match="text_to_image"):
        M.recall_at_k(sim, [0, 0, 1, 3, 2])


def test_recall_at_k_counts_ties_against_the_item():
    # a constant similarity ranks nothing: each right answer ties with every wrong one (5 images,
    # one caption each: 4 wrong candidates tie, so rank 4: found at K=5, not at K=1 or 4)
    r = M.recall_at_k(torch.zeros(5, 5), range(5), ks=(1, 4, 5))
    assert r["i2t_R@1"] == 0 and r["t2i_R@1"] == 0 and r["i2t_R@4"] == 0 and r["i2t_R@5"] == 1
    # image 0's caption (0.5) ties with caption 1 (0.5): rank 1; image 1's (0.2) is alone first
    sim = torch.tensor([[0.5, 0.5], [0.1, 0.2]])
    i2t, t2i = M.retrieval_ranks(sim, [0, 1])
    assert i2t.tolist() == [1, 0]
    # caption 0: its image 0.5 beats 0.1: rank 0; caption 1: image 1 (0.2) is below image 0 (0.5): rank 1
    assert t2i.tolist() == [0, 1]


# --- VQA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("the dog", "dog"), ("Yes.", "yes"), ("isnt", "isn't"), ("a red, white bus", "red white bus"),
    ("1,000", "1000"), ("3.5", "3.5"), ("  left\n", "left"), ("none", "0"), ("t-shirt", "t shirt"),
])
def test_vqa_answer_normalization_as_the_official_evaluation(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_vqa_accuracy_official_values():
    # the VQA accuracy: min(#humans / 3, 1) averaged over the 10 leave-one-out subsets;
    # 1, 2, 3 and 4 matching humans out of 10 give 0.3, 0.6, 0.9 and 1.0
    for matches, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        humans = ["yes"] * matches + ["no"] * (10 - matches)
        assert M.vqa_accuracy("Yes", humans) == pytest.approx(expected)
    assert M.vqa_accuracy("Two", ["2"] * 10) == 1.0  # the answer is normalized
    assert M.vqa_accuracy("two", ["two"] * 10) == 0.0  # unanimous human answers are compared as given
    with pytest.raises(InputError):
        M.vqa_accuracy("yes", [])


# --- captions -------------------------------------------------------------------------------------

CANDIDATES = {"a": "Red kite over hills.", "b": "green boat near town"}
REFERENCES = {"a": ["red kite over hills"], "b": ["Green boat near docks!"]}


def test_vqa_human_answers_are_compared_as_the_pre_2021_official_code_does():
    """GT-Vision-Lab/VQA vqaEval.py before "Fixed processing answers bug" (2021), worked by hand:
    the generated answer is stripped and normalized; the human answers are not stripped, not
    lower-cased and get no digit/article processing, only punctuation processing, and only when
    they are not all equal."""
    # ' red' keeps its space: no human matches 'red' (0.0 there; stripping the humans gives 0.9)
    assert M.vqa_accuracy("red", [" red"] * 3 + ["blue"] * 7) == 0.0
    # humans are not lower-cased: 'Red' never matches the normalized 'red'
    assert M.vqa_accuracy("red", ["Red"] * 4 + ["blue"] * 6) == 0.0
    # punctuation processing of the humans: 'yes.' loses its period -> 'yes' (3 matches: 0.9);
    # 'yes!' has its '!' replaced by a space -> 'yes ' (no match)
    assert M.vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
    # unanimous humans are compared as given: 'Two' -> '2' matches ten '2' (the 2021 code: 0)
    assert M.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert M.vqa_accuracy(" two dogs\n", ["2 dogs"] * 10) == 1.0
    # 2 of 10 humans: each of the 8 others' subsets holds both (2/3), each matching one's holds
    # the other (1/3): (8 x 2/3 + 2 x 1/3) / 10 = 0.6
    assert M.vqa_accuracy("cat", ["cat", "cat"] + [f"dog{i}" for i in range(8)]) == pytest.approx(0.6)
    # the official overall figure: round(100 x mean, 2)
    assert M.vqa_overall([1.0, 0.3, 0.0]) == 43.33


@pytest.mark.skipif(not M.java_available(), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_cider_and_bleu_against_hand_computation():
    """Two images, one reference each, no n-gram shared between images (so every n-gram has idf
    log(2) and the tf-idf vectors are plain counts times log 2). CIDEr-D per image = 10 x mean over
    n=1..4 of the clipped cosine (equal lengths: no length penalty):
      a: the candidate equals its reference (after PTB tokenization): 1 for every n -> 10;
      b: 'green boat near town' vs 'green boat near docks': n=1: 3/4, n=2: 2/3, n=3: 1/2, n=4: 0
         -> 10 x (3/4 + 2/3 + 1/2 + 0) / 4 = 230/48.
    BLEU-4 (corpus): clipped matches 7/8, 5/6, 3/4, 1/2 over both; equal lengths, no brevity penalty."""
    s = M.caption_scores(CANDIDATES, REFERENCES)
    assert s["per_item"]["a"]["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert s["per_item"]["b"]["CIDEr"] == pytest.approx(230 / 48, abs=1e-6)
    assert s["CIDEr"] == pytest.approx((10 + 230 / 48) / 2, abs=1e-6)
    assert s["BLEU-4"] == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25, abs=1e-6)
    assert s["BLEU-1"] == pytest.approx(7 / 8, abs=1e-6)
    empty = M.caption_scores({"a": "", "b": "green boat near town"}, REFERENCES)  # an empty caption scores 0
    assert empty["per_item"]["a"]["CIDEr"] == 0.0


@pytest.mark.skipif(not M.java_available(), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_line_breaks_in_captions_do_not_shift_the_references():
    """The PTB tokenizer reads one caption a line: a \\r or \\n inside a caption must not move the
    others onto the wrong image. The same captions as the hand computation above, broken over lines."""
    s = M.caption_scores({"a": "Red kite\rover hills.", "b": "green boat\r\nnear town"},
                         {"a": ["red kite\nover hills"], "b": ["Green\x0bboat near docks!"]})
    assert s["per_item"]["a"]["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert s["per_item"]["b"]["CIDEr"] == pytest.approx(230 / 48, abs=1e-6)


@pytest.mark.skipif(not M.java_available(), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_an_empty_caption_scores_as_the_official_pipeline():
    """An empty generated caption is an empty line for the PTB tokenizer, a hypothesis of 0 words:
    by hand, with REFERENCES, candidates '' and 'green boat near town': 3 of 4 hypothesis words
    match, the hypotheses have 4 words and the closest references 8, so BLEU-1 = 3/4 x exp(1 - 8/4)
    (a placeholder word would make it 3/5 x exp(1 - 8/5)). And every value as pycocoevalcap
    computes it when called the official way (COCOEvalCap.evaluate: PTBTokenizer on both sides,
    then Bleu(4) and Cider()) on a small set with empty and blank captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    s = M.caption_scores({"a": "", "b": "green boat near town"}, REFERENCES)
    assert s["BLEU-1"] == pytest.approx(0.75 * math.exp(1 - 8 / 4), rel=1e-6)
    assert s["per_item"]["a"]["CIDEr"] == 0.0

    refs = {"1": ["A cat on a mat.", "A cat sits on the mat"], "2": ["Two dogs run in a park!", "dogs running"],
            "3": ["A red bus on the street", "a bus"], "4": ["A cup of coffee", "coffee in a white cup"],
            "5": ["A man holding a camera.", "a camera"]}
    cands = {"1": "a cat on the mat", "2": "", "3": "a red bus", "4": "  ", "5": "a man with a camera"}
    ours = M.caption_scores(cands, refs)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tok.tokenize({i: [{"caption": cands[i]}] for i in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert ours["CIDEr"] == pytest.approx(cider, abs=1e-12)
    for n in range(4):
        assert ours[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)


def test_caption_scores_without_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InputError, match="Java"):
        M.caption_scores(CANDIDATES, REFERENCES)
    with pytest.raises(InputError, match="same ids"):
        M.caption_scores({"a": "x"}, REFERENCES)


# --- FID / IS -------------------------------------------------------------------------------------

class ColorClasses(nn.Module):
    """Logits of 3 classes: the image's dominant channel (a stand-in classifier for IS)."""

    def forward(self, x):
        return 50.0 * F.one_hot(x.float().mean((2, 3)).argmax(1), 3).float()


def crops(shift: int = 0) -> list[Image.Image]:
    out = []
    for p in PHOTOS:
        img = Image.open(p).convert("RGB")
        for k in range(3):
            box = (k * 40, k * 30, k * 40 + 160, k * 30 + 160)
            arr = np.asarray(img.crop(box)).astype(np.int16) + shift
            out.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    return out


def test_fid_of_a_set_with_itself_is_zero_and_matches_the_formula_for_a_shifted_set():
    real, shifted = crops(), crops(shift=60)
    f = TinyFeatures()
    same = M.image_set_scores(real, real, fid_features=f, size=64)["FID"]
    assert abs(same) < 1e-3
    fid = M.image_set_scores(real, shifted, fid_features=f, size=64)["FID"]
    # the Frechet distance by its formula (numpy / scipy), on the same features
    with torch.no_grad():
        a = f(M.to_uint8_batch(real, 64)).double().numpy()
        b = f(M.to_uint8_batch(shifted, 64)).double().numpy()
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid > 1e-3
    assert fid == pytest.approx(expected, rel=1e-3)
    with pytest.raises(InputError, match="at least 2"):
        M.image_set_scores(real[:1], real, fid_features=f)


def test_inception_score_counts_equally_likely_confident_classes():
    solid = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue") for _ in range(2)]
    # IS = exp(E KL(p(y|x) || p(y))): confident and uniform over 3 classes -> exp(log 3) = 3
    assert M.image_set_scores([], solid, is_logits=ColorClasses(), size=32)["IS"] == pytest.approx(3.0, abs=1e-4)
    assert M.image_set_scores([], solid[:2], is_logits=ColorClasses(), size=32)["IS"] == pytest.approx(1.0, abs=1e-4)


def test_inception_weights_must_be_a_local_plain_state_dict(tmp_path):
    from seed import CheckpointError

    with pytest.raises(CheckpointError, match="download_weights.py --model inception"):
        M.inception_modules(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "obj": TinyFeatures()}, bad)
    with pytest.raises(CheckpointError, match="not a plain"):
        M.inception_modules(bad)


# --- CLIP -----------------------------------------------------------------------------------------

def test_clip_scores_are_cosines_of_projected_embeddings(tiny_clip_with_tokenizer):
    from transformers import CLIPModel

    clip = M.Clip(tiny_clip_with_tokenizer)
    imgs = [Image.open(p).convert("RGB") for p in PHOTOS]
    f = clip.image_features(imgs)
    assert f.shape == (3, 16) and torch.allclose(f.norm(dim=-1), torch.ones(3))
    assert float(f[0] @ clip.image_features(imgs[:1])[0]) == pytest.approx(1.0, abs=1e-5)  # an image with itself
    t = clip.text_features(["a cat", "a camera"])
    # by hand: the text model's pooled output (EOS token) through the text projection
    model = CLIPModel.from_pretrained(tiny_clip_with_tokenizer).eval()
    ids = clip.tokenizer(["a cat"], return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(**ids).pooler_output
        ref = F.normalize(model.text_projection(pooled), dim=-1)[0]
    assert torch.allclose(t[0], ref, atol=1e-5)


def test_clip_that_is_not_local_says_how_to_get_it():
    from seed import CheckpointError

    with pytest.raises(CheckpointError, match="download_weights.py --model clip"):
        M.Clip("nobody/no-such-clip")


# --- codebook -------------------------------------------------------------------------------------

def test_codebook_stats_by_hand():
    codes = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # 8 codes: 0 x4, 1 x2, 2 x1, 3 x1
    s = M.codebook_stats(codes, codebook_size=16, top=2)
    p = np.array([4, 2, 1, 1]) / 8
    h = -(p * np.log(p)).sum()  # 1.2130 nats = 1.75 bits
    assert s["used"] == 4 and s["usage"] == 4 / 16
    assert s["entropy_bits"] == pytest.approx(1.75) and s["perplexity"] == pytest.approx(math.exp(h))
    assert s["entropy_per_position_bits"] == pytest.approx([0.0, 1.5])  # position 1: 1/2, 1/4, 1/4
    assert s["most_used"] == [[0, 4], [1, 2]] and s["least_used"] == [[3, 1], [2, 1]]
    with pytest.raises(InputError, match=r"\[0, 16\)"):
        M.codebook_stats(torch.tensor([[0, 16]]), codebook_size=16)


# --- PSNR / SSIM ----------------------------------------------------------------------------------

def test_psnr_and_ssim_by_hand():
    """Uniform images stay uniform when resized: reference gray 128, image gray 153 (of 255).
    PSNR = 10 log10(1 / MSE) = 20 log10(255 / 25); SSIM of constant images is its luminance term
    (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 x data range)^2 (the contrast/structure terms are 1)."""
    ref = Image.new("RGB", (40, 30), (128, 128, 128))
    img = Image.new("RGB", (64, 64), (153, 153, 153))
    psnr, ssim = M.pixel_scores(ref, [img, ref], size=32)
    a, b, c1 = 128 / 255, 153 / 255, 0.01 ** 2
    assert psnr[0] == pytest.approx(20 * math.log10(255 / 25), abs=1e-4)
    assert ssim[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=3e-4)  # float32 variances
    assert ssim[1] == pytest.approx(1.0) and psnr[1] == math.inf  # an image against itself
    # a noisy image: PSNR from the MSE of the resized pixels, computed here with numpy
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mse = ((np.asarray(noisy, dtype=np.float64) - 128) / 255) ** 2
    assert M.pixel_scores(ref, [noisy], size=32)[0][0] == pytest.approx(10 * math.log10(1 / mse.mean()), abs=1e-4)


# --- which weights made the numbers -----------------------------------------------------------------

def test_metric_weights_are_hashed_by_content(tiny_clip_with_tokenizer, tmp_path):
    import hashlib
    import shutil

    from transformers import CLIPModel

    a, b = TinyFeatures(0), TinyFeatures(0)
    assert M.weights_sha256(a) == M.weights_sha256(b)
    with torch.no_grad():
        b.proj.weight[0, 0] += 1e-3
    assert M.weights_sha256(a) != M.weights_sha256(b)
    rec = M.metric_weights(None, a, None)
    assert rec == {"clip": None, "inception": {"sha256": M.weights_sha256(a), "standard": False}}
    # CLIP: the same weights under another folder name hash the same; changed weights do not
    clip = M.Clip(tiny_clip_with_tokenizer)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_clip_with_tokenizer, copy)
    assert M.Clip(copy).weights_sha256 == clip.weights_sha256
    model = CLIPModel.from_pretrained(copy)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1e-3
    model.save_pretrained(copy)
    assert M.Clip(copy).weights_sha256 != clip.weights_sha256
    # Inception: the file's sha256 (the standard file's is known: torch-fidelity's / pytorch-fid's)
    assert M.INCEPTION_SHA256.startswith("6726825d") and "6726825d" in M.INCEPTION_FILE
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, path)
    fake = type("Stub", (nn.Module,), {})()
    fake.weights_sha256 = M.file_sha256(path)
    assert fake.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert M.metric_weights(None, fake, fake)["inception"] == {"sha256": fake.weights_sha256, "standard": False}


def test_inception_weights_that_are_not_the_standard_ones_are_warned_about(tmp_path, caplog):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # the right name, other content
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - not an InceptionV3: torch-fidelity cannot load it
        M.inception_modules(path)
    assert "not the standard FID Inception weights" in caplog.text
