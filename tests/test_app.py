"""The web demo's handlers (seed.app), called directly: tiny random LM, tiny SEED-2, 2 decoding steps.

The page itself is driven in a real browser by tests/test_app_browser.py.
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, TINY, TINY2
from PIL import Image

from seed import InputError

if importlib.util.find_spec("gradio") is None:
    pytest.skip("needs gradio: pip install -e '.[app]'", allow_module_level=True)
from seed.app import Demo, demo_from_args, main, new_state, parse_args, parse_codes  # noqa: E402 (before gradio)

import gradio as gr  # noqa: E402

PHOTO = str(PHOTOS[0])
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def demo() -> Demo:
    return demo_from_args(parse_args(["--llm", "tiny", "--config", str(TINY2), f"diffusion.steps={STEPS}"]))


def png_header(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) claiming ``width x height`` RGB, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Uploads the app must refuse: file -> what the message must say."""
    d = tmp_path_factory.mktemp("uploads")
    (d / "notes.png").write_text("this is a text file, not a PNG\n")
    (d / "bomb.png").write_bytes(png_header(40000, 40000))
    (d / "empty.png").write_bytes(b"")
    Image.new("1", (6000, 5000)).save(d / "huge.png")  # a real image (~4 KB) under Pillow's bomb limit
    return {"text": (d / "notes.png", "not an image"), "bomb": (d / "bomb.png", "decompression bomb"),
            "empty": (d / "empty.png", "empty"),
            "huge": (d / "huge.png", "6000x5000 is 30 megapixels; this demo reads images of at most 25 megapixels")}


def run_turn(demo: Demo, state: dict, text: str = "", files: tuple = (), **settings) -> list[tuple]:
    """All the yields of one chat turn (settings: the handler's keyword arguments)."""
    kw = {"seed": 0, "steps": STEPS, "max_new_tokens": 24, **settings}
    return list(demo.chat({"text": text, "files": [str(f) for f in files]}, state, **kw))


def shown(messages: list[dict]) -> list[str]:
    return [str(m["content"]) for m in messages]


def test_flags_choose_models_like_the_scripts_and_bind_locally():
    args = parse_args(["--llm", "tiny", "--config", str(TINY2), "diffusion.steps=3"])
    assert (args.host, args.share, args.llm, args.overrides) == ("127.0.0.1", False, "tiny", ["diffusion.steps=3"])
    d = demo_from_args(args)
    assert d.pipe.random_weights and d.pipe.template == "vicuna"
    assert d._decode_defaults()["steps"] == 3
    assert "Random weights" in d.random_notice
    assert demo_from_args(parse_args(["--llm", "tiny", "--template", "llama2"])).pipe.template == "llama2"
    tokenizer_only = demo_from_args(parse_args(["--llm", "none", "--config", str(TINY)]))
    assert tokenizer_only.pipe is None
    with pytest.raises(SystemExit):
        parse_args(["--template", "nope"])
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set by seed.app, before gradio loads


def test_overrides_with_a_saved_folder_say_they_apply_to_configs(demo, tmp_path, capsys):
    folder = tmp_path / "tokenizer"
    demo.tokenizer.save_pretrained(folder)
    assert main(["--llm", "none", "--config", str(folder), "diffusion.steps=5"]) == 2
    assert "overrides apply to a config name or YAML file, not to the saved tokenizer folder" in capsys.readouterr().out
    saved = demo_from_args(parse_args(["--llm", "none", "--config", str(folder)]))
    assert saved.tokenizer.cfg.diffusion.steps == STEPS  # the folder's own config


def test_a_hub_id_without_network_is_one_line_at_once(tmp_path):
    """demo_app.py with a Hub id and no network (HF_ENDPOINT refuses connections, empty cache):
    exit 2 with one line naming the model and how to work offline, no retries."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, str(ROOT / "demo_app.py"), "--llm", "someone/some-llm", "--config",
                           str(TINY2)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 2, printed
    assert printed.count("\n") == 1 and printed.startswith("error: llm: cannot load 'someone/some-llm': the network "
                                                           "or the Hugging Face Hub (http://127.0.0.1:9) is unreachable")
    assert "HF_HUB_OFFLINE=1" in printed and "local folder" in printed and "Retrying" not in printed


def test_parse_codes_reads_every_pasted_form_and_names_bad_tokens():
    assert parse_codes("[1, 2, 3]") == parse_codes("1 2 3") == parse_codes("1,2;\n3") == [1, 2, 3]
    for text, match in (("", "paste 32 integers"), ("1 2 x3", "'x3' is not an integer"), ("1.5", "not an integer")):
        with pytest.raises(InputError, match=match):
            parse_codes(text)


def test_encode_shows_32_codes_and_decode_of_them_gives_the_same_images(demo):
    codes_text, gallery = demo.encode_image(PHOTO, seed=7, steps=STEPS, samples=2)
    codes = parse_codes(codes_text)
    assert codes == demo.tokenizer.encode([PHOTO])[0].tolist() and len(codes) == 32
    assert [label for _, label in gallery] == ["input", "sample 1 (seed 7)", "sample 2 (seed 7)"]
    assert np.array_equal(np.asarray(Image.open(gallery[0][0])), np.asarray(Image.open(PHOTO).convert("RGB")))
    again = demo.decode_codes(codes_text, seed=7, steps=STEPS, samples=2)
    for (a, _), (b, _) in zip(gallery[1:], again):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    other_seed = demo.decode_codes(codes_text, seed=8, steps=STEPS, samples=1)
    assert not np.array_equal(np.asarray(Image.open(other_seed[0][0])), np.asarray(Image.open(again[0][0])))


def test_a_big_upload_is_encoded_whole_and_sent_back_as_a_thumbnail(demo, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 2400, 3), dtype=np.uint8)).save(big)
    codes_text, gallery = demo.encode_image(str(big), seed=0, steps=STEPS, samples=1)
    assert parse_codes(codes_text) == demo.tokenizer.encode([str(big)])[0].tolist()
    width, height = Image.open(gallery[0][0]).size
    assert width == 1024 and abs(width / height - 1.5) < 0.01


def test_a_seed1_config_works_in_the_tokenizer_tab():
    d = Demo(str(TINY), None)
    codes_text, gallery = d.encode_image(PHOTO, seed=0, steps=1, samples=1)
    assert d.tokenizer.variant == "seed1" and len(parse_codes(codes_text)) == 32 and len(gallery) == 2


def test_chat_with_a_seed1_image_tokenizer_says_it_needs_seed2():
    d = Demo(str(TINY), "tiny")
    with pytest.raises(gr.Error, match="SEED-2"):
        run_turn(d, new_state(), "What is this?", [PHOTO])


@pytest.mark.parametrize("kind", ["text", "bomb", "empty", "huge"])
def test_bad_uploads_are_a_message_naming_the_file(demo, bad_files, kind):
    path, match = bad_files[kind]
    with pytest.raises(gr.Error, match=match) as err:
        demo.encode_image(str(path), seed=0, steps=STEPS, samples=1)
    assert path.name in err.value.message and str(path.parent) not in err.value.message  # no server paths
    state = new_state()
    with pytest.raises(gr.Error, match=match):
        run_turn(demo, state, "What is this?", [path])
    assert state == new_state()


@pytest.mark.parametrize("text, match", [
    ("1 2 3", r"expected 32 integers, got 3"), (" ".join(["5"] * 31 + ["8192"]), r"8192 \(code 32\) is outside"),
    (" ".join(["-1"] * 32), r"-1 \(code 1\) is outside"), ("", "paste 32"),
    (" ".join(["a"] * 32), "not an integer")])
def test_bad_codes_are_a_message(demo, text, match):
    with pytest.raises(gr.Error, match=match):
        demo.decode_codes(text, seed=0, steps=STEPS, samples=1)


def test_bad_settings_are_a_message(demo):
    with pytest.raises(gr.Error, match="steps"):
        demo.decode_codes(" ".join(["1"] * 32), seed=0, steps=1.5, samples=1)
    with pytest.raises(gr.Error, match="samples"):
        demo.decode_codes(" ".join(["1"] * 32), seed=0, steps=1, samples=9)
    with pytest.raises(gr.Error, match="upload an image"):
        demo.encode_image(None, seed=0, steps=1, samples=1)


@pytest.mark.parametrize("setting, value, match", [
    ("seed", math.nan, "seed must be an integer"), ("seed", math.inf, "seed must be an integer"),
    ("seed", -math.inf, "seed must be an integer"), ("steps", math.nan, "steps must be an integer"),
    ("max_new_tokens", math.inf, "max new tokens must be an integer"), ("max_new_tokens", math.nan, "max new tokens"),
    ("temperature", math.nan, "temperature must be a number"), ("top_p", math.inf, "top-p must be a number")])
def test_settings_that_are_not_finite_numbers_are_a_message(demo, setting, value, match):
    state = new_state()
    with pytest.raises(gr.Error, match=match) as err:
        run_turn(demo, state, "Hi", **{setting: value})
    assert "went wrong" not in err.value.message and state == new_state()
    if setting in ("seed", "steps"):
        settings = {"seed": 0, "steps": 1, "samples": 1, setting: value}
        with pytest.raises(gr.Error, match=match):
            demo.decode_codes(" ".join(["1"] * 32), **settings)
        with pytest.raises(gr.Error, match=match):
            demo.encode_image(PHOTO, **settings)
    with pytest.raises(gr.Error, match="samples must be an integer"):
        demo.decode_codes(" ".join(["1"] * 32), seed=0, steps=1, samples=math.nan)


def test_leaving_a_turn_stops_its_generation_at_once(demo):
    run_turn(demo, new_state(), "Hi")  # the LM is loaded
    turn = demo.chat({"text": "Tell me a long story.", "files": []}, new_state(), seed=1, max_new_tokens=2000)
    for _ in range(3):  # the pending turn, then the reply's first words
        next(turn)
    start = time.monotonic()
    turn.close()  # what Gradio does when the user leaves
    assert time.monotonic() - start < 2  # stopped, not waited for (2000 tokens take several seconds)
    assert not [t for t in threading.enumerate() if t.name == "seed-demo-generate"]  # the LM is free again


def test_chat_turn_with_an_image_keeps_its_codes_in_the_history(demo):
    outs = run_turn(demo, new_state(), "What is this animal?", [PHOTO])
    assert outs[0][0][-1]["metadata"]["status"] == "pending"  # the turn shows at once, then the reply streams
    streamed = [o[0][-1]["content"] for o in outs[1:-1]]
    assert len(streamed) >= 2 and all(isinstance(t, str) and t for t in streamed)
    assert all(len(a) <= len(b) for a, b in zip(streamed, streamed[1:]))  # growing
    messages, state, _, _ = outs[-1]
    assert messages[0]["content"] == {"path": PHOTO} and messages[1]["content"] == "What is this animal?"
    assert messages[-1]["role"] == "assistant"
    (turn,) = state["turns"]
    image, text = turn["user"]["content"]
    assert image["codes"] == demo.tokenizer.encode([PHOTO])[0].tolist() and text == "What is this animal?"
    assert turn["assistant"]["role"] == "assistant"


def test_force_image_shows_the_image_its_codes_and_a_download(demo):
    state = run_turn(demo, new_state(), "Hello")[-1][1]
    with pytest.raises(gr.Error, match="an image takes 33 new tokens"):
        run_turn(demo, state, "Draw a cat.", force_image=True, max_new_tokens=32)
    outs = run_turn(demo, state, "Draw a cat.", force_image=True, max_new_tokens=40)
    messages, state, _, images = outs[-1]
    assert any(m.get("metadata", {}).get("title") == "drawing" for m in outs[-2][0])  # decoding showed progress
    assert len(state["turns"]) == 2 and len(images) >= 1
    shown_images = [m["content"]["path"] for m in messages if isinstance(m["content"], dict)]
    assert shown_images == images
    codes_msgs = [m for m in messages if m.get("metadata", {}).get("title", "").startswith("codes of image 1")]
    codes = parse_codes(codes_msgs[0]["content"])
    assert codes == state["turns"][1]["assistant"]["content"][0].tolist()
    decoded = demo.pipe.decode_images(torch.tensor([codes]), seed=0, steps=STEPS)[0]
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(images[0]).convert("RGB")))


def test_malformed_spans_are_shown_not_raised(demo):
    messages = run_turn(demo, new_state(), "Say anything.", constrain=False, max_new_tokens=40)[-1][0]
    assert any("malformed image span" in s for s in shown(messages))


def test_empty_message_and_failures_leave_the_conversation_as_it_was(demo, monkeypatch):
    state = run_turn(demo, new_state(), "Hi")[-1][1]
    with pytest.raises(gr.Error, match="empty"):
        run_turn(demo, state, "   ")
    with pytest.raises(gr.Error, match="max new tokens"):
        run_turn(demo, state, "Hi", max_new_tokens=0)

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(demo.pipe, "chat", broken)
    with pytest.raises(gr.Error, match="Something went wrong.*out of memory") as err:
        outs = []
        for out in demo.chat({"text": "Hi again", "files": []}, state, seed=0, steps=STEPS, max_new_tokens=8):
            outs.append(out)
    assert "Traceback" not in err.value.message
    assert outs[-1][0] == shown_display(state) and outs[-1][1] is state  # the page is restored
    assert outs[-1][2]["value"] == {"text": "Hi again", "files": []}  # the message is given back
    monkeypatch.undo()
    assert len(run_turn(demo, state, "Hi again")[-1][1]["turns"]) == 2


def shown_display(state: dict) -> list[dict]:
    return [m for t in state["turns"] for m in t["display"]]


def test_undo_and_clear(demo):
    state = run_turn(demo, new_state(), "One")[-1][1]
    state = run_turn(demo, state, "Two", force_image=True, max_new_tokens=40)[-1][1]
    messages, undone, images = Demo.undo(state)
    assert len(undone["turns"]) == 1 and images == [] and messages == state["turns"][0]["display"]
    assert len(state["turns"]) == 2  # the old state is not changed in place
    assert Demo.clear() == ([], new_state(), [])
    assert Demo.undo(new_state())[1] == new_state()


def test_the_page_builds_with_both_tabs_and_the_notice(demo):
    page = demo.build()
    config = page.get_config_file()
    labels = {c["props"].get("label") for c in config["components"]}
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"chatbot", "chat-input", "force", "codes", "tok-upload", "random-notice"} <= ids
    assert {"Chat", "Tokenizer"} <= labels
    limits = {(f.name, f.concurrency_id, f.concurrency_limit) for f in page.fns.values() if f.queue}
    assert limits == {("chat", "chat", 1), ("encode_image", "tokenizer", 2), ("decode_codes", "tokenizer", 2)}


# --------------------------------------------------------------------------- the running app's API
# The app as a user starts it (demo_app.py, tiny models) in a subprocess, once for these tests;
# the last one stops it with SIGTERM.


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, proc, log path) of ``demo_app.py --llm tiny`` serving on a free loopback port."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("served")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(tmp / "gradio"), CUDA_VISIBLE_DEVICES="")
    log_path = tmp / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "demo_app.py", "--llm", "tiny", "--config", str(TINY2), "--port",
                                 str(port), f"diffusion.steps={STEPS}"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the demo did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
    yield url, proc, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def docs_example(language: str) -> str:
    """The ``language`` code block of docs/web_demo.md's "From code" section."""
    import re

    from conftest import ROOT

    section = (ROOT / "docs" / "web_demo.md").read_text().split("## From code", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    return block


def test_the_api_has_one_named_endpoint_per_action(served):
    from gradio_client import Client

    api = Client(served[0], verbose=False).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/chat", "/undo", "/clear", "/encode_image", "/decode_codes"}
    assert not api["unnamed_endpoints"]
    names = {e: ([p["parameter_name"] for p in info["parameters"]], [r["label"] for r in info["returns"]])
             for e, info in api["named_endpoints"].items()}
    assert names["/chat"] == (["message", "force_image", "temperature", "top_p", "max_new_tokens", "seed", "steps",
                               "constrain", "template"], ["chat", "message", "Generated images"])
    assert names["/encode_image"] == (["image", "seed", "steps", "samples"], ["codes", "Input and reconstructions"])
    assert names["/decode_codes"] == (["codes", "seed", "steps", "samples"], ["Input and reconstructions"])
    assert names["/clear"] == names["/undo"] == ([], ["chat", "Generated images"])
    settings = [p for e in ("/chat", "/encode_image", "/decode_codes") for p in api["named_endpoints"][e]["parameters"]
                if p["parameter_name"] not in ("message", "image", "codes")]
    assert all(p["parameter_has_default"] for p in settings)  # a client passes only what it changes
    usage = Client(served[0], verbose=False).view_api(print_info=False, return_format="str")
    assert "value_" not in usage and "-> (chat, message, generated_images)" in usage


def test_the_docs_gradio_client_example_runs(served, monkeypatch, capsys):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # its image path is relative to the repository
    code = docs_example("python").replace("http://127.0.0.1:7860/", served[0])
    assert code != docs_example("python")
    scope: dict = {}
    exec(compile(code, "docs/web_demo.md", "exec"), scope)
    codes = json_codes(scope["codes"])
    assert len(codes) == 32 and [i["caption"] for i in scope["images"]] == ["sample 1 (seed 7)"]
    assert all(Image.open(i["image"]).size == (i_size := Image.open(scope["images"][0]["image"]).size)
               for i in scope["images"]) and i_size[0] > 0
    assert scope["chat"][0]["role"] == "user" and scope["chat"][-1]["role"] == "assistant"
    assert "[[{" in capsys.readouterr().out  # the assistant messages, printed


def json_codes(text: str) -> list[int]:
    import json

    return json.loads(text)


def test_the_docs_curl_example_runs(served):
    import subprocess

    script = docs_example("bash").replace("http://127.0.0.1:7860", served[0].rstrip("/"))
    proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "event: complete" in proc.stdout and '"caption": "sample 1 (seed 7)"' in proc.stdout, proc.stdout


def test_a_non_image_upload_is_a_message_without_a_traceback(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served[0], verbose=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all\n")
    with pytest.raises(AppError, match="notes.txt: not an image"):
        client.predict(image=handle_file(str(notes)), api_name="/encode_image")
    with pytest.raises(AppError, match="notes.txt: not an image"):
        client.predict(message={"text": "What is this?", "files": [handle_file(str(notes))]}, api_name="/chat")
    assert "Traceback" not in served[2].read_text()


def test_sigterm_logs_a_clean_shutdown(served):  # last: it stops the app
    import signal

    _, proc, log_path = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = log_path.read_text()
    assert "INFO seed.app: stopped (SIGTERM): the server is closed and the generated images are removed" in log
    assert "Traceback" not in log, log[-3000:]
