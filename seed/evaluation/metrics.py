"""The metrics the SEED papers report, from the field's libraries where one exists.

- Retrieval recall R@K both ways (`recall_at_k`) from an image x text similarity matrix (the
  BLIP / LAVIS definition: an image counts as found when any of its captions is in its top K;
  ties count against the item).
- VQA accuracy (`vqa_accuracy`) with the official answer normalization (`normalize_answer`), the
  semantics of the VQA challenge's pre-2021 ``vqaEval.py`` (GT-Vision-Lab/VQA, before the commit
  "Fixed processing answers bug"; the version LAVIS and the SEED code use); no maintained package holds it.
- CIDEr-D and BLEU-4 (`caption_scores`) through pycocoevalcap, the COCO caption reference code,
  with its Stanford PTB tokenizer (Java).
- CLIP-I / CLIP-T (`Clip`) with transformers' ``CLIPModel``: cosine similarities of projected
  CLIP embeddings (the papers print 100 x these).
- FID and Inception Score (`image_set_scores`) with torchmetrics, on torch-fidelity's
  InceptionV3 (the TF-ported weights every FID paper uses) or any feature module.
- PSNR and SSIM (`pixel_scores`) with torchmetrics: pixel metrics that need no downloaded weights.
- Codebook usage (`codebook_stats`): share of codes used, perplexity, entropy per position.

Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)


# --- retrieval ------------------------------------------------------------------------------------

def retrieval_ranks(sim: torch.Tensor, text_to_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank (0 = first) of each image's best own caption, long [N_images], and of each
    caption's image, long [N_texts], in ``sim`` float [N_images, N_texts].

    Ties count against the item (pessimistic): the rank is the number of *wrong* candidates at
    least as similar as the right one, so a constant similarity finds nothing at K=1.
    """
    import torch

    n_img, n_txt = sim.shape
    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)
    if owner.numel() != n_txt or (n_txt and (owner.min() < 0 or owner.max() >= n_img)):
        raise InputError(f"text_to_image must give one image index in [0, {n_img}) per text ({n_txt}); "
                         f"got {owner.numel()} values")
    sim = sim.float()
    mine = owner[None, :] == torch.arange(n_img)[:, None]                       # [N_img, N_txt]
    best = sim.masked_fill(~mine, float("-inf")).max(dim=1).values             # [N_img]
    i2t_rank = ((sim >= best[:, None]) & ~mine).sum(dim=1)
    t2i_rank = ((sim >= sim[owner, torch.arange(n_txt)][None, :]) & ~mine).sum(dim=0)
    return i2t_rank, t2i_rank


def recall_at_k(sim: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from ``sim`` float [N_images, N_texts] (higher = more similar).

    ``text_to_image[j]`` is the index of caption j's image. Image -> text: image i is found at K
    when any of its captions is among its K most similar texts; text -> image: caption j is found
    when its image is among its K most similar images; a wrong candidate as similar as the right
    one ranks above it (`retrieval_ranks`). Returns ``{"i2t_R@1": ..., "t2i_R@1": ...,
    "mean_recall": ...}`` as fractions in [0, 1] (the papers print 100 x).
    """
    i2t_rank, t2i_rank = retrieval_ranks(sim, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = (i2t_rank < k).double().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i_rank < k).double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


# --- VQA ------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _punctuation(text: str) -> str:
    """vqaEval.processPunctuation, quirks included (``re.UNICODE`` passed as ``count``)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words -> digits, articles dropped, contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it: ``"Two dogs."`` -> ``"2 dogs"``."""
    return _digits_articles(_punctuation(_clean(answer)))


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """The VQA accuracy of one answer against the (10) human answers, as the pre-2021 ``vqaEval.py``
    of GT-Vision-Lab/VQA computes it (the version LAVIS and the original SEED code copy).

    The answer is cleaned (line breaks and tabs -> spaces, stripped) and normalized
    (`normalize_answer`). The human answers are taken as given: not stripped, not lower-cased,
    no digits or articles; only when they are not all equal is their punctuation processed (so
    ``" red"`` never matches ``"red"``, and ten ``"two"`` never match ``"Two"`` -> ``"2"``). Each
    human answer is one annotation (the official ones carry distinct ``answer_id``): the score is
    ``min(1, #matching other humans / 3)`` averaged over the leave-one-annotator-out subsets: with
    10 answers, 1 match gives 0.3, 2 give 0.6, 3 give 0.9, 4 or more 1.0. Not rounded (the
    official code rounds only what it prints: see `vqa_overall`).
    """
    if not human_answers:
        raise InputError("vqa_accuracy needs at least one human answer")
    res = normalize_answer(answer)
    gts = list(human_answers)
    if len(set(gts)) > 1:
        gts = [_punctuation(a) for a in gts]
    matches = [g == res for g in gts]
    accs = [min(1.0, (sum(matches) - m) / 3) for m in matches]
    return sum(accs) / len(accs)


def vqa_overall(accuracies: Sequence[float]) -> float:
    """The official overall figure: ``round(100 * mean, 2)`` of the per-question accuracies
    (`vqa_accuracy`, unrounded), as ``vqaEval.setAccuracy`` reports it."""
    if not accuracies:
        raise InputError("vqa_overall needs at least one accuracy")
    return round(100 * float(sum(accuracies)) / len(accuracies), 2)


# --- captions -------------------------------------------------------------------------------------

def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """CIDEr-D and BLEU-1..4 of candidate captions, as the COCO caption evaluation computes them.

    ``candidates``: id -> the generated caption; ``references``: id -> the human captions (same
    ids). Both are tokenized by pycocoevalcap's Stanford PTB tokenizer (lower case, punctuation
    removed), which runs in Java: without ``java`` on the PATH this is an `InputError` saying so.
    CIDEr's document frequencies come from the references given, so scores depend on the whole
    set (as in the official evaluation). An empty (or blank) candidate is scored as the official
    pipeline scores it: a hypothesis of no words (no placeholder word). Returns ``{"CIDEr", "BLEU-1".."BLEU-4"}`` (corpus values;
    the papers print 100 x CIDEr and BLEU) and ``"per_item": {id: {"CIDEr": ...}}``.
    """
    if set(candidates) != set(references):
        raise InputError(f"candidates and references must have the same ids "
                         f"({len(set(candidates) ^ set(references))} differ)")
    if not candidates:
        raise InputError("no captions to score")
    if not java_available():
        raise InputError("CIDEr/BLEU need Java: pycocoevalcap tokenizes captions with the Stanford PTB "
                         "tokenizer (a .jar). Install a JRE (e.g. apt-get install default-jre-headless)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer import ptbtokenizer

    ids = sorted(candidates)

    def one_line(caption: str) -> str:  # the tokenizer reads one caption a line: \r, \n... would shift them
        return " ".join(caption.split())

    # the PTB tokenizer writes a temporary file next to its .jar: it must be writable
    jar_dir = Path(ptbtokenizer.__file__).parent
    if not os.access(jar_dir, os.W_OK):
        raise InputError(f"pycocoevalcap's tokenizer folder {jar_dir} is not writable (its PTB tokenizer "
                         "writes a temporary file there); install seed in a writable environment")
    tok = ptbtokenizer.PTBTokenizer()
    # the tokenizer reads one caption per line: whitespace (line breaks included) becomes one space.
    # An empty caption stays an empty line, as in the official pipeline: it tokenizes to "", a
    # hypothesis of 0 words (BLEU: no matches and length 0 in the corpus counts; CIDEr 0)
    gts = tok.tokenize({i: [{"caption": one_line(c)} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": one_line(candidates[i])}] for i in ids})
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    out: dict[str, Any] = {"CIDEr": float(cider), **{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}}
    out["per_item"] = {i: {"CIDEr": float(cider_items[n]), "BLEU-4": float(bleu_items[3][n])}
                       for n, i in enumerate(ids)}
    return out


# --- CLIP -----------------------------------------------------------------------------------------

class Clip:
    """A transformers CLIP model for CLIP-I (image-image) and CLIP-T (image-text) similarity.

    ``name``: a local folder or a Hugging Face Hub id; read from the local cache only unless
    ``allow_download`` (a missing model is a `CheckpointError` that says how to get it).
    """

    def __init__(self, name: str | os.PathLike, device: str | torch.device = "cpu", allow_download: bool = False):
        from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPModel

        name = str(name)
        self.name = name
        try:
            model = CLIPModel.from_pretrained(name, local_files_only=not allow_download)
            self.weights_sha256 = weights_sha256(model)
            """sha256 of the weights (`weights_sha256`): which CLIP made the scores, whatever its name."""
            self.model = model.to(device).eval()
            try:
                self.processor = AutoProcessor.from_pretrained(name, local_files_only=not allow_download)
                self.image_processor = self.processor.image_processor
                self.tokenizer = self.processor.tokenizer
            except (OSError, ValueError, TypeError, AttributeError):
                self.image_processor = CLIPImageProcessor.from_pretrained(name, local_files_only=not allow_download)
                try:
                    self.tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not allow_download)
                except (OSError, ValueError):
                    self.tokenizer = None
        except OSError as e:
            hint = "" if allow_download else (" (looked locally only: run scripts/download_weights.py --model clip, "
                                              "or pass --allow-download)")
            raise CheckpointError(f"cannot load the CLIP model {name!r}{hint}: {str(e).splitlines()[0]}") from None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> L2-normalized projected CLIP image embeddings, float32 [N, projection_dim] (CPU)."""
        import torch

        with torch.inference_mode():
            px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=px.to(self.device, self.model.dtype))
            out = getattr(out, "pooler_output", out)
            return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalized projected CLIP text embeddings, float32 [N, projection_dim] (CPU);
        texts longer than the model's context are truncated."""
        import torch

        if self.tokenizer is None:
            raise CheckpointError(f"the CLIP model {self.name!r} has no tokenizer files: CLIP-T needs them")
        with torch.inference_mode():
            enc = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device))
            out = getattr(out, "pooler_output", out)
            return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


# --- pixels ---------------------------------------------------------------------------------------

def pixel_scores(reference: Image.Image, images: Sequence[Image.Image], size: int = 256) -> tuple[list[float], list[float]]:
    """PSNR (dB) and SSIM of each of ``images`` against ``reference`` (torchmetrics; no weights).

    All are converted to RGB and resized to ``size`` x ``size`` (bicubic, aspect ratio not kept,
    as the tokenizer resizes its input), as float32 [0, 1] (data range 1). PSNR is per image (MSE
    over its pixels and channels); SSIM with torchmetrics' default Gaussian window (11, sigma 1.5),
    averaged over the image. Returns (PSNR list, SSIM list), one value per image.
    """
    import numpy as np
    import torch
    from PIL import Image as PILImage
    from torchmetrics.functional.image.psnr import peak_signal_noise_ratio
    from torchmetrics.functional.image.ssim import structural_similarity_index_measure

    def tensor(im: Image.Image) -> torch.Tensor:
        a = np.asarray(im.convert("RGB").resize((size, size), PILImage.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1)

    if not images:
        return [], []
    fake = torch.stack([tensor(im) for im in images])                   # float32 [N,3,size,size]
    real = tensor(reference)[None].expand_as(fake)
    psnr = peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
    return [float(v) for v in psnr.reshape(-1)], [float(v) for v in ssim.reshape(-1)]


def weights_sha256(module: torch.nn.Module) -> str:
    """A content hash of a network's weights: sha256 over its state dict (each tensor's name, dtype,
    shape and bytes, in name order). The same weights give the same hash wherever they are read
    from (file format, folder, Hub id); any changed value changes it."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- FID / IS -------------------------------------------------------------------------------------

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's InceptionV3 (the TF FID network's weights); `scripts/download_weights.py --model inception`."""
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""sha256 of `INCEPTION_FILE` (95,628,359 bytes; its name carries the first 8 hex digits, as torch.hub
checks them): the standard FID weights. Other weights give numbers that do not compare with papers'."""


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inception_modules(weights: str | os.PathLike) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torch-fidelity's InceptionV3 from a local weight file: (2048-d pool features for FID,
    1008-class logits for IS). Both take uint8 images [N,3,H,W] (resized to 299 inside).

    Both modules carry ``weights_sha256``, the file's sha256; weights other than the standard FID
    ones (`INCEPTION_SHA256`) are warned about (their FID / IS do not compare with published ones)."""
    import torch
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"Inception weights not found: {path} (scripts/download_weights.py --model inception "
                              f"fetches {INCEPTION_FILE})")
    try:  # torch-fidelity unpickles it in full: check first that it holds tensors only
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a plain InceptionV3 state dict ({type(e).__name__}: {e})") from None
    digest = file_sha256(path)
    if digest != INCEPTION_SHA256:
        logger.warning("%s is not the standard FID Inception weights (sha256 %s, expected %s for %s): FID / IS "
                       "will not compare with published numbers", path, digest[:16], INCEPTION_SHA256[:16],
                       INCEPTION_FILE)
    fid = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path))
    is_ = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                             feature_extractor_weights_path=str(path))
    fid.num_features = 2048
    fid.weights_sha256 = is_.weights_sha256 = digest
    return fid, is_


def metric_weights(clip: Clip | None = None, fid_features: torch.nn.Module | None = None,
                   is_logits: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a run records of its metric networks: ``{"clip": {"name", "sha256"}, "inception":
    {"sha256", "standard"}}`` (None for one not used). A module without ``weights_sha256`` (a
    stand-in feature network) is hashed by its state dict (`weights_sha256`)."""
    def digest(m: Any) -> str | None:
        if m is None:
            return None
        return getattr(m, "weights_sha256", None) or weights_sha256(m)

    fid, is_ = digest(fid_features), digest(is_logits)
    inception = None
    if fid or is_:
        inception = {"sha256": fid or is_, "standard": (fid or is_) == INCEPTION_SHA256}
        if fid and is_ and fid != is_:
            inception["is_sha256"] = is_
    return {"clip": {"name": clip.name, "sha256": clip.weights_sha256} if clip is not None else None,
            "inception": inception}


def to_uint8_batch(images: Sequence[Image.Image], size: int = 299) -> torch.Tensor:
    """PIL images -> uint8 [N,3,size,size] (bicubic resize, RGB)."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    arrays = [np.asarray(im.convert("RGB").resize((size, size), PILImage.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_set_scores(real: Sequence[Any], fake: Sequence[Any], *, fid_features: torch.nn.Module | None = None,
                     is_logits: torch.nn.Module | None = None, batch_size: int = 32, size: int = 299,
                     is_splits: int = 1, load=None) -> dict[str, float]:
    """FID of ``fake`` against ``real`` and the Inception Score of ``fake`` (torchmetrics).

    ``real``/``fake``: PIL images, or anything ``load`` turns into one (e.g. paths), read a batch
    at a time. ``fid_features``: a module uint8 [N,3,size,size] -> float [N,D] (torch-fidelity's
    InceptionV3 from `inception_modules`, or a stand-in); ``is_logits``: uint8 images -> class logits.
    Either may be None to skip that metric. IS uses ``is_splits`` splits (the original SEED code's
    default: 1). Returns ``{"FID": ..., "IS": ..., "IS_std": ...}`` for what was computed.
    """
    import warnings

    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    load = load or (lambda x: x)
    out: dict[str, float] = {}
    fid = FrechetInceptionDistance(feature=fid_features) if fid_features is not None else None
    iscore = None
    if is_logits is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            iscore = InceptionScore(feature=is_logits, splits=is_splits)

    def batches(seq: Sequence[Any]):
        for s in range(0, len(seq), batch_size):
            yield to_uint8_batch([load(x) for x in seq[s:s + batch_size]], size)

    with torch.inference_mode():
        if fid is not None:
            if len(real) < 2 or len(fake) < 2:
                raise InputError(f"FID needs at least 2 images in each set (got {len(real)} real, "
                                 f"{len(fake)} generated)")
            for b in batches(real):
                fid.update(b, real=True)
        for b in batches(fake) if (fid is not None or iscore is not None) else ():
            if fid is not None:
                fid.update(b, real=False)
            if iscore is not None:
                iscore.update(b)
        if fid is not None:
            out["FID"] = float(fid.compute())
        if iscore is not None:
            torch.manual_seed(0)  # IS permutes the samples before splitting
            with warnings.catch_warnings():  # std of 1 split
                warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
                mean, std = iscore.compute()
            out["IS"], out["IS_std"] = float(mean), float(std) if is_splits > 1 else 0.0
    return out


# --- codebook -------------------------------------------------------------------------------------

def codebook_stats(codes: torch.Tensor, codebook_size: int = 8192, top: int = 10) -> dict[str, Any]:
    """Usage of a codebook from codes int [N, L] (L = 32 positions).

    Returns ``used`` (distinct codes), ``usage`` (used / codebook_size), ``perplexity``
    (exp of the entropy of the code frequencies, natural log: the number of equally used codes
    with the same entropy), ``entropy_bits`` (log2 of the same), ``entropy_per_position_bits``
    (L values: the entropy of position i's codes), ``most_used`` / ``least_used`` (``[code,
    count]``, ``top`` each; the least used among the codes that occur) and ``counts`` (a
    LongTensor [codebook_size]).
    """
    import torch

    codes = torch.as_tensor(codes)
    if codes.dim() != 2 or codes.numel() == 0 or codes.dtype.is_floating_point:
        raise InputError(f"codes must be a non-empty integer tensor [N, L], got {tuple(codes.shape)} {codes.dtype}")
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise InputError(f"codes must lie in [0, {codebook_size}); found {int(codes.min())}..{int(codes.max())}")
    codes = codes.long()

    def entropy(c: torch.Tensor) -> float:
        p = torch.bincount(c.flatten(), minlength=codebook_size).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())

    counts = torch.bincount(codes.flatten(), minlength=codebook_size)
    h = entropy(codes)
    order = torch.argsort(counts, descending=True, stable=True)
    used = int((counts > 0).sum())
    nonzero = order[:used]
    return {
        "used": used, "usage": used / codebook_size, "perplexity": math.exp(h), "entropy_bits": h / math.log(2),
        "entropy_per_position_bits": [entropy(codes[:, i]) / math.log(2) for i in range(codes.shape[1])],
        "most_used": [[int(c), int(counts[c])] for c in order[:top]],
        "least_used": [[int(c), int(counts[c])] for c in nonzero.flip(0)[:top]],
        "counts": counts,
    }
