"""The app in a real browser: headless Debian Chromium, driven by Playwright, against `python app.py --demo`.

Chromium's fake media devices make the microphone button record a real espeak-ng file, so the spoken
path runs end to end: browser recording → upload → whisper → transcript in the chat → streamed answer.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from app import EXAMPLES_DIR
from tests.kit import serving_app

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by the README's test command
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)

# How the answer grew: every text the last bot message showed, recorded in the page as it changes.
RECORD_STREAM = """() => {
    window.answerTexts = [];
    const chat = document.querySelector('#chat');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        if (text && window.answerTexts.at(-1) !== text) window.answerTexts.push(text);
    }).observe(chat, {childList: true, subtree: true, characterData: true});
}"""


MAX_RECORDING = 5  # seconds a recording may last here (30 in the app: whisper's window)


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-app") / "app.log"
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MAX_RECORDING", str(MAX_RECORDING))
        with serving_app(["--demo"], log) as url:
            yield url


@pytest.fixture
def page(demo_url, speech_wav):
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: run the README's test command, which installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--use-fake-ui-for-media-stream",  # grant the microphone without asking
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={speech_wav}",  # what the "microphone" hears
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(demo_url)
        yield page
        browser.close()


def messages(page: Page, role: str):
    return page.locator(f'#chat [data-testid="{role}"]')


def test_typed_then_spoken_question_in_a_real_browser(page, tmp_path):
    expect(page.locator("#header")).to_contain_text("Demo mode")  # --demo says its answers are meaningless
    expect(page.locator("#header")).to_contain_text("demo (tiny random models)")

    # The upload's change event (which starts a new conversation) has run once the server answered it.
    with page.expect_response(lambda response: response.url.endswith("/gradio_api/run/predict")):
        page.locator("#image input[type=file]").set_input_files(EXAMPLES_DIR / "shapes.png")
    expect(page.locator("#image img")).to_be_visible()
    page.evaluate(RECORD_STREAM)
    page.locator("#question textarea").fill("What colour is the circle?")
    page.locator("#question textarea").press("Enter")

    expect(messages(page, "user")).to_have_text(["What colour is the circle?"])
    expect(messages(page, "bot")).to_have_count(1)
    expect(page.locator("#question textarea")).to_have_value("")  # cleared once answered
    # The answer arrived in pieces, not all at once. (Not checked as prefixes of each other: partial
    # Markdown, such as an unclosed `*`, renders differently once the rest arrives.)
    grown = page.evaluate("window.answerTexts")
    assert len(grown) >= 3, grown
    assert grown[-1] == messages(page, "bot").first.inner_text()

    # Record a spoken question through the microphone button, then ask it.
    page.locator("#audio button.record-button").click()
    page.wait_for_timeout(2500)
    # Stopping uploads the recording; Ask before the upload finished would send no audio at all.
    with page.expect_response(lambda response: "/gradio_api/upload" in response.url and response.ok):
        page.locator("#audio button.stop-button").first.click()
    # The recorder gave way to the recording's player: the question is ready to send.
    expect(page.locator("#audio button.record-button")).to_have_count(0)
    page.locator("#ask").click()

    expect(messages(page, "user").or_(page.locator(".toast-body"))).to_have_count(2)
    assert not page.locator(".toast-body").count(), page.locator(".toast-body").all_inner_texts()
    spoken = messages(page, "user").nth(1)
    expect(spoken).to_contain_text("🎤")  # the transcript of what was heard is shown as the question
    assert len(spoken.inner_text().replace("🎤", "").strip()) > 0
    expect(messages(page, "bot")).to_have_count(2)
    expect(messages(page, "bot").nth(1)).not_to_have_text("")
    page.screenshot(path=tmp_path / "app.png", full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_a_recording_stops_by_itself_at_its_maximum_length(page):
    page.locator("#audio button.record-button").click()
    started = time.monotonic()
    # Nobody presses stop: the page does, and the recording is uploaded.
    with page.expect_response(lambda response: "/gradio_api/upload" in response.url and response.ok):
        pass
    assert MAX_RECORDING - 0.5 < time.monotonic() - started < MAX_RECORDING + 10
    expect(page.locator("#audio button.record-button")).to_have_count(0)  # a recording is ready to send
