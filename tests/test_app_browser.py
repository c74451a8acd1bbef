"""The web demo in a real headless browser: Debian's Chromium driven by Playwright.

The app runs as a user starts it (``demo_app.py --llm tiny --config configs/seed2_tiny.yaml
--port PORT``, plus ``diffusion.steps=2`` to keep decoding cheap) in a subprocess, once for the
module. Without Chromium these tests skip (``apt-get install chromium``; `.ci/run` does it).

The screenshot of the chat goes to ``assets/web_demo.png`` (the README's) when that file is
missing or ``SEED_UPDATE_SCREENSHOT=1``; otherwise to the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PHOTOS, ROOT
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[test]'")
expect = sync_api.expect

CHROMIUM = next((p for p in (os.environ.get("SEED_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
if CHROMIUM is None and os.environ.get("CI"):  # CI runs them for real: .ci/run installs Debian's chromium
    raise RuntimeError("the browser tests need Chromium in CI: .ci/run installs it (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium for the browser tests: "
                                "`apt-get install chromium` (Debian/Ubuntu), or set SEED_CHROMIUM=/path/to/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PHOTO = str(PHOTOS[0])
CODES = re.compile(r"^\[\d+(, \d+){31}\]$")
TIMEOUT = 30_000  # ms: generous for two shared CPU cores
SCREENSHOT = ROOT / "assets" / "web_demo.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo, started by its command line: (url, proc, tmp: its TMPDIR)."""
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    (tmp / "tmp").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(tmp / "gradio"), TMPDIR=str(tmp / "tmp"))
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "demo_app.py", "--llm", "tiny", "--config", "configs/seed2_tiny.yaml",
                             "--port", str(port), "diffusion.steps=2"], cwd=ROOT, env=env, stdout=log,
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
                pytest.fail(f"the demo did not start:\n{(tmp / 'app.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield SimpleNamespace(url=url, proc=proc, tmp=tmp / "tmp")
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    out = (tmp / "app.log").read_text()
    assert "Traceback" not in out, out[-3000:]  # every failure became a message, none a crash


@pytest.fixture(scope="module")
def server(app) -> str:
    """The demo's URL."""
    return app.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def outside() -> list[str]:
    """Requests the pages made to anywhere but the app (must stay empty: nothing phones home)."""
    return []


@pytest.fixture(scope="module")
def page(browser, server, outside):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.on("request", lambda r: None if r.url.startswith(server) else outside.append(r.url))
    pg.goto(server)
    yield pg
    context.close()


def toast(page, text: str):
    return page.locator("[data-testid=toast-body]").filter(has_text=text)


def loaded_images(locator) -> int:
    """How many of the images are decoded by the browser (a real picture, not a broken link)."""
    return sum(locator.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(locator.count()))


def upload(page, path: str | Path) -> None:
    """Put a file in the Tokenizer tab's upload box (clearing the one there)."""
    clear = page.locator("#tok-upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#tok-upload input[type=file]").set_input_files(str(path))


def test_tokenizer_tab_shows_codes_and_reconstructions_then_decodes_pasted_codes(page):
    expect(page.get_by_text("Random weights:")).to_be_visible()
    page.get_by_role("tab", name="Tokenizer").click()
    upload(page, PHOTO)
    codes = page.locator("#codes textarea")
    expect(codes).to_have_value(CODES, timeout=TIMEOUT)
    images = page.locator("#tok-images img")
    expect(images).to_have_count(3, timeout=TIMEOUT)  # the input and 2 samples
    page.wait_for_function("() => [...document.querySelectorAll('#tok-images img')].every(i => i.naturalWidth > 0)")
    assert loaded_images(images) == 3

    values = [int(c) for c in re.findall(r"\d+", codes.input_value())]
    assert all(0 <= c < 8192 for c in values)
    first = images.nth(1).get_attribute("src")
    codes.fill(" ".join(str(c) for c in values[::-1]))  # other codes, pasted as plain numbers
    page.locator("#decode").click()
    expect(images).to_have_count(2, timeout=TIMEOUT)
    expect(images.first).not_to_have_attribute("src", first)
    page.wait_for_function("() => [...document.querySelectorAll('#tok-images img')].every(i => i.naturalWidth > 0)")


def test_bad_input_is_a_message_and_the_page_keeps_working(page, tmp_path):
    page.get_by_role("tab", name="Tokenizer").click()
    (tmp_path / "notes.png").write_text("not an image at all\n")
    bomb = tmp_path / "bomb.png"
    from test_app import png_header

    bomb.write_bytes(png_header(40000, 40000))
    for path, message in ((tmp_path / "notes.png", "notes.png: not an image"),
                          (bomb, "bomb.png: refused as a decompression bomb")):
        upload(page, path)
        expect(toast(page, message)).to_be_visible(timeout=TIMEOUT)
    codes = page.locator("#codes textarea")
    for text, message in (("1 2 3", "expected 32 integers, got 3"), ("7 " * 31 + "9000", "9000 (code 32) is outside")):
        codes.fill(text)
        page.locator("#decode").click()
        expect(toast(page, message)).to_be_visible(timeout=TIMEOUT)
    codes.fill("")
    upload(page, PHOTO)  # still serving
    expect(codes).to_have_value(CODES, timeout=TIMEOUT)


def send(page, text: str, files: list[str] = ()) -> None:
    box = page.locator("#chat-input")
    if files:
        box.locator("input[type=file]").set_input_files(files)
        expect(box.locator("img")).to_have_count(len(files), timeout=TIMEOUT)  # the previews: uploaded
    box.locator("textarea").fill(text)
    box.locator("textarea").press("Enter")


def chat_settings(page, max_new_tokens: int, seed: int) -> None:
    """Open the generation settings and set the max new tokens and the seed."""
    if not page.locator("#max-new-tokens").is_visible():
        page.get_by_text("Generation settings").click()
    for box, value in ((page.locator("#max-new-tokens input[type=number]"), max_new_tokens),
                       (page.locator("#chat-seed input"), seed)):
        box.fill(str(value))
        box.press("Enter")


def test_chat_with_an_image_gets_a_reply(page):
    page.get_by_role("tab", name="Chat").click()
    chat_settings(page, max_new_tokens=40, seed=0)  # short answers: room for at most one image
    with page.expect_response(lambda r: "/gradio_api/queue/join" in r.url):
        send(page, "What is this animal?", [PHOTO])
    chat = page.locator("#chatbot")
    expect(chat.locator("[data-testid=user]").filter(has_text="What is this animal?")).to_be_visible(timeout=TIMEOUT)
    expect(chat.locator("[data-testid=user] img")).to_have_count(1, timeout=TIMEOUT)
    expect(chat.locator("[data-testid=bot]").first).to_be_visible(timeout=TIMEOUT)
    expect(chat.get_by_text("thinking")).to_have_count(0, timeout=TIMEOUT)  # the turn is over
    expect(page.locator("#chat-input textarea")).to_be_editable(timeout=TIMEOUT)


def test_forced_image_shows_in_the_chat_with_its_codes(page, tmp_path):
    page.get_by_role("tab", name="Chat").click()
    chat_settings(page, max_new_tokens=40, seed=1)  # room for one image: 32 codes and </img>
    chat = page.locator("#chatbot")
    bot_images, gallery = chat.locator("[data-testid=bot] img"), page.locator("#chat-images img")
    before = bot_images.count()
    assert gallery.count() == before
    page.locator("#force input[type=checkbox]").check()
    send(page, "Draw a cat on a sofa.")
    expect(chat.get_by_text(re.compile(r"codes of image \d+ \(32\)"))).to_have_count(before + 1, timeout=TIMEOUT)
    expect(bot_images).to_have_count(before + 1, timeout=TIMEOUT)
    page.wait_for_function("() => [...document.querySelectorAll('#chatbot [data-testid=bot] img')]"
                           ".every(i => i.naturalWidth > 0)")
    expect(gallery).to_have_count(before + 1, timeout=TIMEOUT)  # the download gallery
    page.locator("#force input[type=checkbox]").uncheck()
    page.get_by_text("Generation settings").click()  # fold the settings for the picture
    for close in page.locator("[data-testid=toast-close]").all():  # and the earlier tests' error messages
        close.click()
    expect(page.locator("[data-testid=toast-body]")).to_have_count(0, timeout=TIMEOUT)

    shot = tmp_path / "web_demo.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20, "the screenshot is blank"
    if not SCREENSHOT.exists() or os.environ.get("SEED_UPDATE_SCREENSHOT") == "1":
        img = Image.open(shot).convert("RGB")
        img = img.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        img.save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size < 200_000


def test_tabs_have_their_own_conversations_and_one_failure_breaks_no_other(browser, server, page, tmp_path):
    users = page.locator("#chatbot [data-testid=user]")
    drawn = users.filter(has_text="Draw a cat on a sofa.")
    assert users.filter(has_text="What is this animal?").count() == 1 and drawn.count() == 1
    other = browser.new_context().new_page()
    other.goto(server)
    other.get_by_role("tab", name="Chat").click()
    expect(other.locator("#chatbot")).to_be_visible()
    assert other.locator("#chatbot [data-testid=user]").count() == 0  # nothing of the first tab's
    chat_settings(other, max_new_tokens=40, seed=0)

    send(other, "   ")  # an empty message
    expect(toast(other, "the message is empty")).to_be_visible(timeout=TIMEOUT)
    (tmp_path / "notes.png").write_text("not an image at all\n")
    send(other, "What is this?", [str(tmp_path / "notes.png")])
    expect(toast(other, "notes.png: not an image")).to_be_visible(timeout=TIMEOUT)
    expect(other.locator("#chatbot [data-testid=user]")).to_have_count(0)  # the failed turn left nothing
    expect(other.locator("#chat-input textarea")).to_have_value("What is this?")  # the message is given back,
    other.locator("#chat-input").get_by_role("button", name="Remove file").click()  # its bad file to remove

    send(other, "Hello from another tab.")  # both tabs at once: the queue serves them in turn
    send(page, "And the first tab again.")
    for pg, text in ((other, "Hello from another tab."), (page, "And the first tab again.")):
        expect(pg.locator("#chatbot [data-testid=user]").filter(has_text=text)).to_be_visible(timeout=TIMEOUT)
        expect(pg.get_by_text("thinking")).to_have_count(0, timeout=TIMEOUT)
        expect(pg.locator("#chat-input textarea")).to_be_editable(timeout=TIMEOUT)
    assert other.locator("#chatbot [data-testid=user]").count() == 1
    other.context.close()

    page.locator("#undo").click()  # undo forgets the last turn of this tab only
    expect(users.filter(has_text="And the first tab again.")).to_have_count(0, timeout=TIMEOUT)
    expect(drawn).to_have_count(1)
    page.locator("#clear").click()
    expect(users).to_have_count(0, timeout=TIMEOUT)
    expect(page.locator("#chat-images img")).to_have_count(0)


def test_only_the_apps_own_files_are_served(server):
    for path in ("/etc/passwd", str(ROOT / "README.md"), PHOTO):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{server}gradio_api/file={path}", timeout=10)
        assert err.value.code == 403, path


def test_nothing_leaves_the_machine(outside):
    assert outside == []


def test_sigterm_stops_the_app_cleanly_and_removes_its_images(app, page):  # last: it stops the app
    (images,) = app.tmp.glob("seed-demo-*")  # the folder of generated images
    page.goto("about:blank")  # no open page: else Gradio waits 5 s for its connections to close
    app.proc.terminate()  # SIGTERM, as kill, systemd and docker stop send
    assert app.proc.wait(30) == 0
    assert not images.exists()
