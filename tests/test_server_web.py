"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against a real server whose model is scripted by a logits hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasoning_llama.server import ServerSettings
from server_fixtures import MODEL, make_checkpoint, make_engine, scripted_hook, serve

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the browser tests need Debian's chromium at /usr/bin/chromium (make browser)",
)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KEY = "page-key"

CODE_REASONING = "The user wants code, so I will show a short Python example. " * 3
CODE_ANSWER = "Here:\n```python\nprint('hi')\n```\nThat is **all** for `now`."
XSS_REASONING = "<script>alert('reasoning')</script> hmm"
XSS_ANSWER = "<img src=x onerror=alert(1)> and <b>bold?</b>"
LIST_ANSWER = "3. three\n4. four\n\nThen my_var_name, _this_ and 2 * 3.\n\n5. five"
SCRIPTS = {
    "[code]": (CODE_REASONING.strip(), CODE_ANSWER),
    "[xss]": (XSS_REASONING, XSS_ANSWER),
    "[list]": ("Listing.", LIST_ANSWER),
    "[long]": ("word " * 240, "never reached"),
    "": ("Thinking it over.", "Hello there!"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-web") / "tiny-test")


@pytest.fixture(scope="module")
def server(checkpoint):
    engine = make_engine(checkpoint, logits_hook=scripted_hook(SCRIPTS, delay_s=0.03))
    with serve(engine) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield browser
        browser.close()


class Chat:
    """A fresh browser context (empty localStorage) on the chat page, recording what a test checks."""

    def __init__(self, browser, server, routes: dict | None = None) -> None:
        self.server = server
        self.context = browser.new_context()
        self.dialogs: list[str] = []
        self.foreign: list[str] = []
        self.bodies: list[dict] = []
        self.context.route("**/*", self._only_this_server)
        for pattern, handler in (routes or {}).items():  # these run first: the last registered does
            self.context.route(pattern, handler)
        self.page = self.context.new_page()
        self.page.on("dialog", self._dialog)
        self.context.on("request", self._request)
        self.open()

    def _only_this_server(self, route) -> None:
        if route.request.url.startswith(self.server.url):
            route.continue_()
        else:
            self.foreign.append(route.request.url)
            route.abort()

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _request(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.bodies.append(json.loads(request.post_data))

    def open(self) -> None:
        self.page.goto(f"{self.server.url}/")
        self.page.wait_for_selector("body[data-ready=true]")

    def ask(self, text: str, *, wait: bool = True) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")
        if wait:
            self.wait_done()

    def wait_done(self) -> None:
        self.page.wait_for_selector("#send:not([hidden])")
        self.page.wait_for_selector("#stop[hidden]", state="attached")

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).all_text_contents()


@pytest.fixture
def chat(browser, server):
    chat = Chat(browser, server)
    yield chat
    chat.context.close()


def test_thinking_and_answer_stream_in(chat):
    page = chat.page
    chat.ask("[code] show me code", wait=False)
    # The Thinking block is open while the reasoning streams ...
    page.wait_for_function(
        "() => { const d = document.querySelector('.assistant details.thinking');"
        " return d && d.open && d.querySelector('.reasoning').textContent.length > 10; }"
    )
    # ... and the answer shows while the generation is still running.
    page.wait_for_function(
        "() => document.querySelector('.assistant .answer').textContent.length > 0"
        " && !document.getElementById('stop').hidden"
    )
    chat.wait_done()
    assert chat.texts(".message.user") == ["[code] show me code"]
    assert chat.texts(".assistant .reasoning") == [CODE_REASONING.strip()]
    assert page.locator(".assistant details.thinking").get_attribute("open") is None  # collapsed after
    assert chat.texts(".assistant .answer pre code") == ["print('hi')"]
    assert chat.texts(".assistant .answer strong") == ["all"]
    assert "now" in chat.texts(".assistant .answer p code")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".assistant details.thinking summary").click()  # show the reasoning in the picture
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)
    assert chat.foreign == []  # the page fetched nothing from elsewhere
    body = chat.bodies[0]
    assert body["model"] == MODEL and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "[code] show me code"}]


def test_the_stop_button_ends_the_generation(chat, server):
    chat.ask("[long] take your time", wait=False)
    chat.page.wait_for_function(
        "() => document.querySelector('.assistant .reasoning').textContent.length > 20"
    )
    chat.page.click("#stop")
    chat.wait_done()
    assert chat.texts(".assistant .note") == ["(stopped)"]
    (reasoning,) = chat.texts(".assistant .reasoning")
    assert 20 < len(reasoning) < len("word " * 240)
    health = server.wait_idle()
    assert (health["active_slots"], health["in_flight"]) == (0, 0)  # the abort freed the slot
    chat.ask("and now?")  # the page is usable again
    assert chat.texts(".assistant .answer")[-1] == "Hello there!"


def test_the_conversation_survives_a_reload_and_new_chat_clears_it(chat):
    chat.ask("hello")
    chat.ask("again")
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.texts(".message.user") == ["hello", "again"]
    assert chat.texts(".assistant .answer") == ["Hello there!", "Hello there!"]
    assert chat.texts(".assistant .reasoning") == ["Thinking it over."] * 2
    # The history goes back to the server without the reasoning.
    chat.ask("third")
    assert chat.bodies[-1]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "third"},
    ]
    chat.page.click("#new-chat")
    assert chat.page.locator(".message").count() == 0
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.page.locator(".message").count() == 0


def test_model_and_user_html_stay_text(chat):
    chat.ask("[xss] <b>my</b> <img src=y onerror=alert(2)>")
    for _ in range(2):  # as streamed, then as restored from localStorage
        assert chat.texts(".assistant .answer") == [XSS_ANSWER]
        assert chat.texts(".assistant .reasoning") == [XSS_REASONING]
        assert chat.texts(".message.user") == ["[xss] <b>my</b> <img src=y onerror=alert(2)>"]
        assert chat.page.locator("img").count() == 0
        assert chat.page.locator("#messages b, #messages script").count() == 0
        assert chat.page.evaluate("document.scripts.length") == 1  # app.js only
        chat.page.reload()
        chat.page.wait_for_selector("body[data-ready=true]")
    chat.page.wait_for_timeout(200)  # an injected onerror would have fired by now
    assert chat.dialogs == []


def test_settings_reach_the_request(chat):
    chat.page.click("#settings summary")
    assert not chat.page.is_visible("#api-key")  # this server needs none
    chat.page.fill("#temperature", "0")
    chat.page.fill("#max-tokens", "3")
    chat.page.fill("#system-prompt", "Be terse.")
    chat.ask("short please")
    body = chat.bodies[-1]
    assert (body["temperature"], body["max_tokens"]) == (0, 3)
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert chat.texts(".assistant .note") == ["(stopped at the token limit)"]
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.page.input_value("#max-tokens") == "3"


def test_old_exchanges_beyond_the_context_are_left_out(chat):
    """As in the terminal chat: the reply keeps room (the server's default, at most half the
    context: 128 of 256 tokens here), and the oldest exchanges that crowd it out stop being sent,
    shown faded, also after a reload; the question is never dropped."""
    from reasoning_llama.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    questions = [f"Question number {i}, a longer one to fill the context sooner." for i in range(8)]
    for question in questions:
        chat.ask(question)
    assert chat.texts(".message.error") == []
    assert chat.texts(".assistant .answer") == ["Hello there!"] * len(questions)
    answered = chat.bodies[-1]
    assert answered["max_tokens"] == 128 and answered["messages"][-1]["content"] == questions[-1]
    assert len(chat.bodies) > len(questions)  # refused as too long, then sent again with less
    prompt = tokenizer.render_prompt(answered["messages"])
    assert len(prompt) + 128 <= 256
    sent = [m["content"] for m in answered["messages"] if m["role"] == "user"]
    faded = chat.texts(".message.user.dropped")
    assert faded and faded + sent == questions  # the oldest ones, exactly those left out
    assert chat.page.locator(".message.assistant.dropped").count() == len(faded)
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.texts(".message.user.dropped") == faded
    chat.ask("One more.")
    assert questions[0] not in json.dumps(chat.bodies[-1]["messages"])
    # Less room for the reply leaves room for older exchanges: they are offered again.
    chat.page.click("#settings summary")
    chat.page.fill("#max-tokens", "16")
    chat.page.press("#max-tokens", "Tab")  # the field's change: on leaving it
    assert chat.page.locator(".message.dropped").count() == 0
    chat.ask("And another.")
    sent_now = [m["content"] for m in chat.bodies[-1]["messages"] if m["role"] == "user"]
    assert len(sent_now) > len(sent) + 2 and len(chat.texts(".message.user.dropped")) < len(faded)


def test_a_long_first_question_gets_the_room_that_is_left(chat):
    """Nothing to leave out and no max tokens in Settings: sent without a limit, the server fits the
    reply into what the context has left (as the terminal chat does), instead of an error."""
    question = "word " * 180  # ~180 tokens of 256: more than half, so less room than the usual 128
    chat.ask(question)
    assert chat.texts(".message.error") == []
    assert chat.texts(".assistant .answer") == ["Hello there!"]
    assert "max_tokens" in chat.bodies[0] and "max_tokens" not in chat.bodies[-1]


def test_a_server_with_an_api_key_gets_a_key_field(browser, checkpoint):
    settings = ServerSettings(model_name=MODEL, api_key=KEY)
    with serve(make_engine(checkpoint, logits_hook=scripted_hook(SCRIPTS)), settings) as keyed:
        chat = Chat(browser, keyed)
        try:
            assert chat.page.is_visible("#api-key")
            chat.page.fill("#api-key", "ключ")
            chat.ask("hello")
            assert "only ASCII" in chat.texts(".message.error")[0]
            chat.page.fill("#api-key", "")
            chat.ask("hello")
            assert "missing API key" in chat.texts(".message.error")[-1]
            assert chat.page.input_value("#prompt") == "hello"  # the question is back in the box
            assert chat.page.locator(".message.user").count() == 0
            chat.page.fill("#api-key", KEY)
            chat.page.dispatch_event("#api-key", "change")
            chat.ask("hello")
            assert chat.texts(".assistant .answer") == ["Hello there!"]
            chat.open()
            assert chat.page.input_value("#api-key") == KEY
        finally:
            chat.context.close()


def ask_while_streaming(chat, question: str = "[long] take your time") -> None:
    chat.ask(question, wait=False)
    chat.page.wait_for_function(
        "() => [...document.querySelectorAll('.assistant .reasoning')].pop()?.textContent.length > 20"
    )


def test_new_chat_during_a_reply_starts_empty(chat):
    ask_while_streaming(chat)
    chat.page.click("#new-chat")
    chat.wait_done()
    assert chat.page.locator(".message").count() == 0
    assert chat.page.text_content("#status") == ""
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.page.locator(".message").count() == 0
    chat.ask("hi")
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_leaving_the_page_during_a_reply_keeps_it_marked(chat):
    ask_while_streaming(chat)
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.texts(".message.user") == ["[long] take your time"]
    assert chat.texts(".assistant .note") == ["(interrupted: the page was left)"]
    assert chat.texts(".assistant .reasoning")[0].startswith("word word")


def at_end(page) -> bool:
    return page.evaluate("() => innerHeight + scrollY >= document.body.scrollHeight - 48")


def test_the_page_follows_a_reply_unless_the_reader_scrolled_up(chat):
    chat.page.set_viewport_size({"width": 800, "height": 400})
    history = [{"role": r, "content": f"message {i}"} for i in range(20) for r in ("user", "assistant")]
    chat.page.evaluate(
        f"localStorage.setItem('reasoning-llama.conversation', {json.dumps(json.dumps(history))})"
    )
    chat.open()
    ask_while_streaming(chat)
    chat.page.wait_for_function(
        "() => document.querySelector('.assistant:last-child .reasoning').textContent.length > 300"
    )
    assert at_end(chat.page)
    chat.page.evaluate("window.scrollTo(0, 0)")
    chat.page.wait_for_timeout(300)  # more reasoning streams in
    assert chat.page.evaluate("scrollY") == 0
    chat.page.click("#stop")
    chat.wait_done()


def test_thinking_reopened_during_the_answer_stays_open(chat):
    chat.ask("[code] again", wait=False)
    chat.page.wait_for_function("() => document.querySelector('.assistant .answer').textContent.length > 0")
    chat.page.locator(".assistant details.thinking summary").click()
    chat.wait_done()
    assert chat.page.locator(".assistant details.thinking").get_attribute("open") is not None


def test_tabs_of_the_page_share_one_conversation_one_reply_at_a_time(chat):
    other = chat.context.new_page()
    other.goto(f"{chat.server.url}/")
    other.wait_for_selector("body[data-ready=true]")
    ask_while_streaming(chat, "[long] from the first tab")
    # While the first tab gets its reply the second waits, keeping what was typed, New chat included.
    other.fill("#prompt", "from the second tab")
    other.press("#prompt", "Enter")
    other.click("#new-chat")
    assert other.text_content("#status").startswith("another tab of this page is getting a reply")
    assert other.input_value("#prompt") == "from the second tab"
    chat.page.click("#stop")
    chat.wait_done()
    other.wait_for_function("() => document.querySelectorAll('.assistant .note').length == 1")
    assert other.text_content("#status") == ""
    other.press("#prompt", "Enter")
    other.wait_for_function("() => document.querySelectorAll('.assistant .answer').length == 2")
    other.wait_for_selector("#send:not([hidden])")
    assert [m["content"] for m in chat.bodies[-1]["messages"]] == [
        "[long] from the first tab",
        "from the second tab",
    ]  # the first reply was stopped in its reasoning: no answer to send back
    chat.page.reload()
    chat.page.wait_for_selector("body[data-ready=true]")
    assert chat.texts(".message.user") == ["[long] from the first tab", "from the second tab"]


def test_a_failed_question_leaves_a_new_draft_alone(chat):
    chat.page.click("#settings summary")
    chat.page.fill("#max-tokens", "5000")  # beyond the 256-token context: refused
    chat.page.evaluate(
        "() => { const prompt = document.getElementById('prompt'); prompt.value = 'first';"
        " document.getElementById('composer').requestSubmit(); prompt.value = 'my next draft'; }"
    )
    chat.wait_done()
    chat.page.wait_for_selector(".message.error")
    assert chat.page.input_value("#prompt") == "my next draft"
    assert "(not sent: “first”)" in chat.texts(".message.error")[0]
    assert chat.page.locator(".message.user").count() == 0


def test_a_conversation_too_large_for_the_browser_still_works(chat):
    chat.ask("x" * 6_000_000)  # over the browser's storage and the server's body limit
    assert "larger than" in chat.texts(".message.error")[0]
    chat.page.fill("#prompt", "")
    chat.ask("hello")
    assert chat.texts(".assistant .answer") == ["Hello there!"]


def test_markdown_lists_keep_their_numbers_and_snake_case_its_underscores(chat):
    chat.ask("[list] please")
    starts = chat.page.eval_on_selector_all(".assistant .answer ol", "lists => lists.map(l => l.start)")
    assert starts == [3, 5]
    assert chat.texts(".assistant .answer ol li") == ["three", "four", "five"]
    assert chat.texts(".assistant .answer em") == ["this"]
    assert "my_var_name" in chat.texts(".assistant .answer p")[0]


def first_answered(answered: list[str], **response):
    """A route handler that answers the first request with `response` (route.fulfill's arguments),
    noting its URL in `answered`, and lets the later ones through to the server."""

    def handler(route) -> None:
        if answered:
            route.continue_()
        else:
            answered.append(route.request.url)
            route.fulfill(**response)

    return handler


def test_max_tokens_is_read_as_a_number_and_a_late_health_check_is_retried(browser, server):
    failed: list[str] = []
    health_fails_once = first_answered(failed, status=503, body="starting")
    chat = Chat(browser, server, routes={"**/health": health_fails_once})
    try:
        assert failed and chat.page.text_content("#status") == "cannot reach the server"
        chat.page.click("#settings summary")
        chat.page.fill("#max-tokens", "1e2")
        chat.ask("hello")
        assert chat.texts(".assistant .answer") == ["Hello there!"]
        assert (chat.bodies[-1]["model"], chat.bodies[-1]["max_tokens"]) == (MODEL, 100)
    finally:
        chat.context.close()


def test_a_server_restarted_with_another_model_is_followed_without_a_reload(browser, server):
    """The page loaded while the server served another model: its first request is refused as for
    another model, and the page reads the server's model again and sends it once more."""
    health = {"model": "old-run", "max_context": 128, "default_max_tokens": 64}
    another_model_first = first_answered([], content_type="application/json", body=json.dumps(health))
    chat = Chat(browser, server, routes={"**/health": another_model_first})
    try:
        assert "old-run" in chat.page.text_content("#model-name")
        chat.ask("hello")
        assert chat.texts(".assistant .answer") == ["Hello there!"]
        assert [body["model"] for body in chat.bodies] == ["old-run", MODEL]
        assert MODEL in chat.page.text_content("#model-name")
    finally:
        chat.context.close()


def test_a_stored_conversation_with_foreign_entries_keeps_its_messages(chat):
    stored = [None, 5, {"role": "user", "content": "kept"}, {"role": "tool"}, {"role": "assistant"}]
    chat.page.evaluate(
        f"localStorage.setItem('reasoning-llama.conversation', {json.dumps(json.dumps(stored))})"
    )
    chat.open()
    assert chat.texts(".message.user") == ["kept"]
    chat.ask("hello")
    assert chat.texts(".assistant .answer") == ["Hello there!"]
    assert [m["content"] for m in chat.bodies[-1]["messages"]] == ["kept", "hello"]
