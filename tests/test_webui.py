"""The web UI in headless Chromium (Debian's /usr/bin/chromium via Playwright) against a fake backend.

Covers streaming, stop, regenerate, edit-and-resend, conversations in localStorage (deleting asks first,
switching leaves a reply streaming), settings (temperature, top-p, max tokens bounded by the model's
context, system prompt), tool-call boxes, markdown (tables, safe links, blockquotes, highlighted code,
the GSM8K final answer) with the model's HTML escaped, and inline errors; screenshots go to test-artifacts/.
Skipped when Chromium is missing, unless $CI is set (then it fails).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_fakes import LONG_WORDS, NOTICE, FakeBackend, ServerThread, echo_text

from picochat.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    _unavailable("playwright is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"Chromium not found at {CHROMIUM}; install it with `apt-get install -y chromium`")
    expect.set_options(timeout=10_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def backend():
    return FakeBackend(delay=0.03, long_delay=0.03)


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(create_app(backend)) as running:
        yield running


def open_page(browser, url: str, **context_options):
    """A page in a fresh context (empty localStorage) that records uncaught page errors."""
    context = browser.new_context(viewport={"width": 1200, "height": 800}, **context_options)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    expect(page.get_by_test_id("model-name")).to_have_text("fake-d4")
    return page


@pytest.fixture()
def page(browser, server):
    page = open_page(browser, server.url)
    yield page
    assert page.errors == [], "JavaScript errors on the page"
    page.context.close()


def screenshot(page, name: str, full_page: bool = False) -> None:
    """Save a screenshot to test-artifacts/ (git-ignored; CI keeps it as an artifact)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


def send(page, text: str) -> None:
    page.get_by_test_id("composer-input").fill(text)
    page.keyboard.press("Enter")


def wait_idle(page) -> None:
    """Wait until no reply is streaming (the send button is back)."""
    expect(page.get_by_test_id("stop")).to_be_hidden()
    expect(page.get_by_test_id("send")).to_be_visible()


def last_request(backend: FakeBackend):
    return backend.requests[-1]


def test_streaming_regenerate_and_edit(page, backend):
    # Record every distinct text the reply shows while it streams.
    page.evaluate(
        """() => {
            window.snapshots = [];
            new MutationObserver(() => {
                const all = document.querySelectorAll('[data-testid=assistant-content]');
                if (all.length) window.snapshots.push(all[all.length - 1].textContent);
            }).observe(document.getElementById('thread'), {childList: true, subtree: true});
        }"""
    )
    send(page, "hello there")
    expect(page.get_by_test_id("stop")).to_be_visible()
    replies = page.get_by_test_id("assistant-content")
    expect(replies).to_have_text([echo_text("hello there")])
    wait_idle(page)
    snapshots = page.evaluate("window.snapshots")
    assert len(set(snapshots)) >= 4, "the reply did not appear token by token"
    assert all(echo_text("hello there").startswith(s) for s in snapshots), snapshots
    expect(page.get_by_test_id("user-content")).to_have_text(["hello there"])

    requests_before = len(backend.requests)
    page.get_by_test_id("regenerate").click()
    expect(page.get_by_test_id("stop")).to_be_visible()
    wait_idle(page)
    expect(replies).to_have_text([echo_text("hello there")])
    assert len(backend.requests) == requests_before + 1
    assert last_request(backend)[0] == [{"role": "user", "content": "hello there"}]

    send(page, "second question")
    expect(replies).to_have_count(2)
    wait_idle(page)
    assert [m["role"] for m in last_request(backend)[0]] == ["user", "assistant", "user"]

    page.get_by_test_id("message-user").first.hover()
    page.get_by_test_id("edit-message").first.click()
    page.get_by_test_id("edit-input").fill("edited question")
    page.get_by_test_id("edit-submit").click()
    wait_idle(page)
    expect(page.get_by_test_id("user-content")).to_have_text(["edited question"])
    expect(replies).to_have_text([echo_text("edited question")])
    assert last_request(backend)[0] == [{"role": "user", "content": "edited question"}]


def test_stop_a_long_reply(page, backend):
    backend.cancel_event.clear()
    send(page, "tell me a long story")
    reply = page.get_by_test_id("assistant-content")
    expect(reply).to_contain_text("word5 ")
    page.get_by_test_id("stop").click()
    wait_idle(page)
    assert backend.cancel_event.wait(5), "stopping in the UI did not cancel the generation"
    expect(page.get_by_text("Stopped.")).to_be_visible()
    partial = reply.text_content()
    assert "word5 " in partial and f"word{LONG_WORDS - 1}" not in partial
    page.wait_for_timeout(300)
    assert reply.text_content() == partial, "text kept arriving after Stop"

    send(page, "after the stop")  # the partial reply is kept as history
    expect(page.get_by_test_id("assistant-content").last).to_have_text(echo_text("after the stop"))
    messages = last_request(backend)[0]
    assert messages[1]["role"] == "assistant" and messages[1]["content"].startswith("word0 word1")


def test_tool_calls_and_markdown(page, backend):
    send(page, "calc 2+3 please")
    box = page.get_by_test_id("tool-call")
    expect(box).to_be_visible()
    expect(box.get_by_test_id("tool-code")).to_have_text("2+3")
    expect(box.get_by_test_id("tool-output")).to_have_text("5")
    expect(page.get_by_test_id("assistant-content")).to_contain_text("The answer is 5.")
    wait_idle(page)

    send(page, "show me markdown")
    reply = page.get_by_test_id("assistant-content").last
    expect(reply.locator("pre code")).to_have_text("print('hi')")
    wait_idle(page)
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("em")).to_have_text("italic")
    expect(reply.locator("li")).to_have_text(["first item", "second item"])
    expect(reply.get_by_test_id("copy-code")).to_be_visible()
    assert reply.locator("script, img").count() == 0
    expect(reply).to_contain_text("<script>window.hacked = 1</script>")
    assert page.evaluate("window.hacked") is None
    # The model's tool call went back to the server as parts, not as text.
    assert last_request(backend)[0][1]["content"] == [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "The answer is 5."},
    ]
    screenshot(page, "webui.png")


def test_conversations_persist_in_local_storage(page):
    page.get_by_test_id("composer-input").fill("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("user-content")).to_have_text(["line one\nline two"])
    wait_idle(page)

    page.get_by_test_id("new-chat").click()
    expect(page.get_by_test_id("empty-state")).to_be_visible()
    page.get_by_test_id("suggestion").first.click()
    wait_idle(page)
    items = page.get_by_test_id("conversation-item")
    expect(items).to_have_count(2)
    expect(items.first).to_contain_text("Why is the sky blue?")  # most recent first

    items.last.get_by_role("button", name="line one").click()
    expect(page.get_by_test_id("user-content")).to_have_text(["line one\nline two"])
    page.reload()
    expect(items).to_have_count(2)
    expect(page.get_by_test_id("user-content")).to_have_text(["line one\nline two"])
    expect(page.get_by_test_id("assistant-content")).to_contain_text("line two. This is a fake reply.")

    items.first.hover()
    items.first.get_by_test_id("delete-conversation").click()  # asks first: Cancel keeps it
    expect(page.get_by_test_id("confirm-delete")).to_contain_text("Why is the sky blue?")
    screenshot(page, "webui-confirm-delete.png")
    page.get_by_test_id("cancel-delete").click()
    expect(page.get_by_test_id("confirm-delete")).to_be_hidden()
    expect(items).to_have_count(2)
    items.first.hover()
    items.first.get_by_test_id("delete-conversation").click()
    page.get_by_test_id("confirm-delete-button").click()
    expect(items).to_have_count(1)
    page.reload()
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("line one")


def test_settings_are_saved_and_sent(page, backend):
    page.get_by_test_id("open-settings").click()
    expect(page.get_by_test_id("setting-api-key")).to_be_hidden()  # this server has no key
    page.get_by_test_id("setting-temperature").fill("0.3")
    page.get_by_test_id("setting-max-tokens").fill("4")
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-dialog")).to_be_hidden()

    send(page, "settings check")
    wait_idle(page)
    expect(page.get_by_test_id("assistant-content")).to_have_text("Echo: settings check. This")
    expect(page.get_by_text("Reply cut at the max tokens limit")).to_be_visible()
    params = last_request(backend)[1]
    assert (params.temperature, params.max_tokens) == (0.3, 4)

    page.reload()
    page.get_by_test_id("open-settings").click()
    expect(page.get_by_test_id("setting-temperature")).to_have_value("0.3")
    expect(page.get_by_test_id("setting-max-tokens")).to_have_value("4")


def test_notices_and_errors_are_shown_inline(page, browser, backend):
    send(page, "notice me")
    expect(page.get_by_test_id("notice")).to_have_text(NOTICE)
    wait_idle(page)

    send(page, "are you busy?")
    error = page.get_by_test_id("error")
    expect(error).to_contain_text("busy")
    expect(error).to_contain_text("429")
    wait_idle(page)

    send(page, "now explode")  # fails mid-reply: the partial text stays, the error shows under it
    expect(error.last).to_contain_text("exploded")
    expect(page.get_by_test_id("assistant-content").last).to_have_text("Echo: now ")
    wait_idle(page)
    # The unanswered "busy" turn is left out of the history sent to the model.
    sent = last_request(backend)[0]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["notice me", "now explode"]

    keyed_backend = FakeBackend()
    with ServerThread(create_app(keyed_backend, api_key="sesame")) as keyed:
        other = open_page(browser, keyed.url)
        send(other, "hello")
        expect(other.get_by_test_id("error")).to_contain_text("API key")
        other.get_by_test_id("open-settings").click()
        other.get_by_test_id("setting-api-key").fill("sesame")
        other.get_by_test_id("save-settings").click()
        other.get_by_test_id("regenerate").click()
        expect(other.get_by_test_id("assistant-content")).to_have_text([echo_text("hello")])
        expect(other.get_by_test_id("error")).to_have_count(0)
        assert other.errors == []
        other.context.close()


def test_narrow_screen_sidebar(browser, server):
    page = open_page(browser, server.url)
    page.set_viewport_size({"width": 390, "height": 780})
    send(page, "hi from a phone")
    wait_idle(page)
    new_chat = page.get_by_test_id("new-chat")
    expect(new_chat).not_to_be_in_viewport()
    page.get_by_test_id("toggle-sidebar").click()
    expect(new_chat).to_be_in_viewport()
    page.get_by_test_id("conversation-item").first.get_by_role("button", name="hi from a phone").click()
    expect(new_chat).not_to_be_in_viewport()
    screenshot(page, "webui-narrow.png")
    assert page.errors == []
    page.context.close()


def test_rich_markdown_is_rendered_safely(page):
    send(page, "rich text please")
    wait_idle(page)
    reply = page.get_by_test_id("assistant-content").last
    expect(reply.locator("table th")).to_have_text(["name", "value"])
    expect(reply.locator("table td")).to_have_text(["a", "1", "b", "2"])
    link = reply.get_by_role("link", name="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    assert "noopener" in link.get_attribute("rel").split()
    # Only http(s) links: the javascript: one is plain text, and images are links, never loaded.
    expect(reply.get_by_role("link")).to_have_count(2)
    expect(reply).to_contain_text("a script")
    expect(reply.get_by_role("link", name="pic")).to_have_attribute("href", "https://example.com/x.png")
    assert reply.locator("img").count() == 0
    expect(reply.locator("blockquote")).to_have_text("A wise quote.")
    code = reply.locator("pre code")
    expect(code).to_have_text("def add(a, b):\n    return a + b  # sum")
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(code.locator(".hljs-comment")).to_have_text("# sum")
    color = code.locator(".hljs-keyword").first.evaluate("e => getComputedStyle(e).color")
    assert color != code.evaluate("e => getComputedStyle(e).color"), "keywords are not highlighted"
    expect(reply.get_by_test_id("final-answer")).to_have_text("Answer42")
    assert reply.locator("h6").count() == 0  # "#### 42" is the final answer, not a tiny heading
    screenshot(page, "webui-markdown.png", full_page=True)
    page.emulate_media(color_scheme="dark")
    screenshot(page, "webui-markdown-dark.png", full_page=True)


def test_switching_conversations_does_not_abort_a_reply(page):
    send(page, "first chat")
    wait_idle(page)
    page.get_by_test_id("new-chat").click()
    send(page, "a long story in the background")
    expect(page.get_by_test_id("assistant-content")).to_contain_text("word3 ")
    items = page.get_by_test_id("conversation-item")
    items.get_by_role("button", name="first chat").click()  # while the story streams
    expect(page.get_by_test_id("user-content")).to_have_text(["first chat"])
    expect(page.get_by_test_id("send")).to_be_visible()  # this conversation is idle
    send(page, "meanwhile here")  # and can be used at the same time
    expect(page.get_by_test_id("assistant-content").last).to_have_text(echo_text("meanwhile here"))
    items.get_by_role("button", name="a long story").click()
    story = page.get_by_test_id("assistant-content")
    expect(page.get_by_test_id("stop")).to_be_visible()  # still streaming
    screenshot(page, "webui-background-reply.png")
    expect(story).to_contain_text(f"word{LONG_WORDS - 1}", timeout=30_000)
    wait_idle(page)  # the story ran to its last word: switching away did not cancel it
    expect(page.get_by_text("Stopped.")).to_have_count(0)


def test_system_prompt_top_p_and_bounded_max_tokens(page, backend):
    page.get_by_test_id("open-settings").click()
    max_tokens = page.get_by_test_id("setting-max-tokens")
    expect(max_tokens).to_have_attribute("max", "1024")  # the fake model's context, from /health
    expect(page.get_by_test_id("settings-dialog")).to_contain_text("at most 1024")
    max_tokens.fill("5000")
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-dialog")).to_be_visible()  # refused: more than the context
    max_tokens.fill("1024")
    page.get_by_test_id("setting-top-p").fill("0.7")
    page.get_by_test_id("setting-system-prompt").fill("You are a pirate.")
    screenshot(page, "webui-settings.png")
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-dialog")).to_be_hidden()
    send(page, "ahoy")
    wait_idle(page)
    messages, params = last_request(backend)
    assert messages == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "ahoy"},
    ]
    assert (params.top_p, params.max_tokens) == (0.7, 1024)
    page.reload()
    page.get_by_test_id("open-settings").click()
    expect(page.get_by_test_id("setting-system-prompt")).to_have_value("You are a pirate.")
    expect(page.get_by_test_id("setting-top-p")).to_have_value("0.7")


def test_choosing_among_several_models(browser):
    small = FakeBackend(model_name="fake-small")
    small.max_context = 256
    main = FakeBackend()
    with ServerThread(create_app([main, small])) as running:
        page = open_page(browser, running.url)
        picker = page.get_by_test_id("model-select")
        expect(picker).to_be_visible()
        expect(picker.locator("option")).to_have_text(["fake-d4", "fake-small"])
        picker.select_option("fake-small")
        page.get_by_test_id("open-settings").click()
        expect(page.get_by_test_id("setting-max-tokens")).to_have_attribute("max", "256")
        page.get_by_test_id("setting-max-tokens").fill("200")
        page.get_by_test_id("save-settings").click()
        send(page, "which one")
        wait_idle(page)
        assert small.requests and small.requests[-1][1].max_tokens == 200 and not main.requests
        page.reload()  # the choice is remembered
        expect(page.get_by_test_id("model-select")).to_have_value("fake-small")
        assert page.errors == []
        page.context.close()
