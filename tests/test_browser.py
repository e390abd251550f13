"""The chat page in headless Chromium (Debian's, driven by playwright): a streamed answer with
NAME, Clear, a message that tries to run script, and Stop / a closed tab ending generation."""
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import IDENTITY_QUESTIONS, NAME

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 120_000
# Records every text the last answer bubble shows, so the test sees the stream, not just its end.
RECORD_ANSWERS = """() => {
    window.shown = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid=bot]');
        if (bots.length) window.shown.push(bots[bots.length - 1].innerText);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def open_chat(browser, app, **settings: float):
    """A fresh tab on the app with the given sampling settings; returns (page, dialogs seen)."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(WAIT_MS)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(app.url, wait_until="domcontentloaded")  # Gradio pages never reach network-idle
    page.locator(".label-wrap", has_text="Settings").click()
    for label, value in settings.items():
        field = page.get_by_label(f"number input for {label}")
        field.fill(str(value))
        field.press("Enter")
    return page, dialogs


def send(page, text: str) -> None:
    box = page.locator("textarea").first  # the chat box (the system prompt's comes later)
    box.fill(text)
    box.press("Enter")


def answered(page, app, text: str) -> None:
    """Send `text` and wait until the server has finished its answer and the page shows it done
    (conditions, not time: the page may not have shown its Stop button yet when it is checked)."""
    finished = app.health()[1]["finished"]
    send(page, text)
    app.wait_for(lambda h: h["finished"] > finished, f"the answer to {text!r}")
    expect(page.locator("button.stop-button")).to_have_count(0)


def test_chat_page_streams_clears_and_renders_markup_harmlessly(browser, chat_app, tmp_path):
    page, dialogs = open_chat(browser, chat_app, **{"Temperature (0 = greedy)": 0, "Repetition penalty": 1})
    page.evaluate(RECORD_ANSWERS)
    answered(page, chat_app, IDENTITY_QUESTIONS[0])
    answer = page.locator("[data-testid=bot]").last
    expect(answer).to_contain_text(NAME)
    final = answer.inner_text()
    shown = [text for text in page.evaluate("window.shown") if text]
    assert any(text != final and final.startswith(text) for text in shown), shown  # streamed
    page.screenshot(path=tmp_path / "answer.png", full_page=True)

    answered(page, chat_app, IDENTITY_QUESTIONS[1])  # the browser sends the history as blocks
    expect(page.locator("[data-testid=bot]")).to_have_count(2)
    assert page.locator("[data-testid=bot]").last.inner_text().strip()

    page.get_by_role("button", name="Clear").click()
    expect(page.locator("[data-testid=user], [data-testid=bot]")).to_have_count(0)

    answered(page, chat_app, "<img src=x onerror=alert(1)>")
    expect(page.locator("[data-testid=bot]")).to_have_count(1)
    assert page.locator("[data-testid=user] [onerror]").count() == 0
    page.screenshot(path=tmp_path / "markup.png", full_page=True)
    assert dialogs == []
    assert (tmp_path / "answer.png").stat().st_size > 0


def test_stop_and_closing_the_tab_end_generation(browser, endless_app):
    page, _ = open_chat(browser, endless_app, **{"Max new tokens": 4096, "Temperature (0 = greedy)": 0})
    before = endless_app.health()[1]
    send(page, "hi")
    expect(page.locator("[data-testid=bot]")).not_to_have_text("")
    page.locator("button.stop-button").click()
    stopped = endless_app.wait_for(lambda h: h["generating"] == 0 and h["stopped"] == before["stopped"] + 1,
                                   "Stop to end the generating thread")

    send(page, "hi again")
    endless_app.wait_for(lambda h: h["generating"] == 1, "the second answer to start")
    page.close()
    after = endless_app.wait_for(lambda h: h["generating"] == 0 and h["stopped"] == before["stopped"] + 2
                                 and h["running"] == 0, "the closed tab to end its answer and free the slot")
    assert after["finished"] == before["finished"]
    assert after["tokens_generated"] - stopped["tokens_generated"] < 4096


HOSTILE_NAME = "<img src=x onerror=alert(1)> O'Brien \"Bob\" `id` {name} %s & 小明 🤖"


@pytest.mark.timeout(400)
def test_page_is_titled_with_the_models_name_and_keeps_history_across_reloads(browser, merged_model, tmp_path):
    import json
    import shutil

    from app_server import AppServer
    model = shutil.copytree(merged_model, tmp_path / "model")
    (model / "assistant.json").write_text(json.dumps({"name": HOSTILE_NAME, "author": "x"}), encoding="utf-8")
    with AppServer({"MODEL_ID": str(model)}) as app:
        page, dialogs = open_chat(browser, app, **{"Temperature (0 = greedy)": 0})
        expect(page.locator("#title h1")).to_have_text(f"{HOSTILE_NAME}'s assistant")  # as typed
        answered(page, app, IDENTITY_QUESTIONS[1])
        expect(page.locator("[data-testid=bot]")).to_have_count(1)
        page.reload(wait_until="domcontentloaded")
        # save_history: the finished conversation is listed and opens again after a reload.
        saved = page.get_by_text(IDENTITY_QUESTIONS[1]).first
        saved.click()
        expect(page.locator("[data-testid=user]")).to_have_text([IDENTITY_QUESTIONS[1]])
        assert dialogs == []


@pytest.mark.timeout(300)
def test_retry_answers_again_and_undo_takes_the_turn_back(browser, chat_app):
    page, dialogs = open_chat(browser, chat_app, **{"Temperature (0 = greedy)": 0, "Repetition penalty": 1})
    answered(page, chat_app, IDENTITY_QUESTIONS[1])
    answer = page.locator("[data-testid=bot]")
    expect(answer).to_have_count(1)
    first = answer.inner_text()
    finished = chat_app.health()[1]["finished"]
    page.get_by_role("button", name="Retry").click()
    chat_app.wait_for(lambda h: h["finished"] == finished + 1, "the retried answer")
    expect(page.locator("button.stop-button")).to_have_count(0)
    expect(answer).to_have_count(1)  # replaced, not added
    expect(answer).to_have_text(first)  # greedy: the same answer again
    page.get_by_role("button", name="Undo").click()
    expect(page.locator("[data-testid=user], [data-testid=bot]")).to_have_count(0)
    expect(page.locator("textarea").first).to_have_value(IDENTITY_QUESTIONS[1])  # back in the box
    assert dialogs == []
