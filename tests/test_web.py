"""The chat page in a real browser: Playwright for Python driving Debian's Chromium (headless) against the real
server with the bundled model. Skipped, with the reason, where Chromium or Playwright is not installed."""
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None
if CHROMIUM is None or sync_playwright is None:
    pytest.skip("browser tests need Debian's chromium (apt-get install chromium) and playwright (pip)",
                allow_module_level=True)

from test_server import KEY, serving  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
FACT = "The secret code of the vault is 4817."
PDF_FACT = "The lighthouse keeper is named Orla."


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The page, past the API key dialog (asked once, then kept for the session)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(server + "/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key", KEY)
    page.click("#key-save")
    expect(page.locator("#model")).to_contain_text("context 4,096 tokens")
    page.reload()  # the key is in sessionStorage: no dialog the second time
    expect(page.locator("#model")).to_contain_text("context 4,096 tokens")
    expect(page.locator("#key-dialog")).to_be_hidden()
    yield page
    context.close()


def make_pdf(path: str, text: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType text: a text layer pypdf can read
    fig = plt.figure(figsize=(6, 2))
    fig.text(0.05, 0.5, text)
    fig.savefig(path)
    plt.close(fig)


def ask(page, question: str, timeout: float = 120_000):
    before = page.locator(".msg.assistant").count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    expect(page.locator(".msg.assistant")).to_have_count(before + 1)
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".meta")).to_contain_text("generated", timeout=timeout)
    return reply


def test_a_question_gets_a_streamed_answer(page):
    chunks = []
    page.on("response", lambda r: chunks.append(r.headers.get("content-type", "")) if "chat/completions" in r.url
            else None)
    reply = ask(page, "What is the capital of France?")
    assert reply.locator(".body").inner_text().strip()
    assert any("text/event-stream" in c for c in chunks)
    expect(page.locator("#send")).to_be_enabled()


def test_attached_text_and_pdf_reach_the_model(page, tmp_path):
    (tmp_path / "notes.txt").write_text(FACT + "\n")
    make_pdf(str(tmp_path / "keeper.pdf"), PDF_FACT)
    page.set_input_files("#files", [str(tmp_path / "notes.txt"), str(tmp_path / "keeper.pdf")])
    expect(page.locator("#attachments")).to_contain_text("notes.txt, keeper.pdf")
    expect(page.locator("#attachments")).to_contain_text("tokens of 4,096")
    with page.expect_request(lambda r: "chat/completions" in r.url) as sent:
        reply = ask(page, "What is the secret code of the vault, and who keeps the lighthouse?")
    body = sent.value.post_data
    assert "4817" in body and "Orla" in body and "--- page 1 ---" in body and "### keeper.pdf" in body
    assert int(reply.locator(".meta").inner_text().split("prompt ")[1].split(" ")[0].replace(",", "")) > 40


def test_a_folder_and_a_repository_zip_attach_as_files_under_their_paths(page, tmp_path):
    import zipfile
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "app.py").write_text("PORT = 8123\n")
    (repo / "node_modules").mkdir()
    (repo / "node_modules" / "dep.js").write_text("ignored\n")
    (repo / "logo.bin").write_bytes(bytes(range(256)))
    page.set_input_files("#folder", str(repo))
    expect(page.locator("#attachments")).to_contain_text("repo/src/app.py")
    expect(page.locator("#notice")).to_contain_text("Skipped 2")  # the binary and node_modules
    with zipfile.ZipFile(tmp_path / "lib.zip", "w") as z:
        z.writestr("lib/util.py", "def helper():\n    return 42\n")
        z.writestr("lib/.git/HEAD", "ref\n")
    page.set_input_files("#files", str(tmp_path / "lib.zip"))
    expect(page.locator("#attachments")).to_contain_text("lib.zip")
    with page.expect_request(lambda r: "chat/completions" in r.url) as sent:
        ask(page, "What does helper return?")
    body = sent.value.post_data
    assert "### repo/src/app.py" in body and "PORT = 8123" in body and "### lib/util.py" in body
    assert "dep.js" not in body and ".git" not in body


def test_long_prefill_shows_progress_and_a_follow_up_comes_from_the_cache(page, tmp_path):
    doc = tmp_path / "story.txt"
    doc.write_text(" ".join(f"Line {i}: the river carried stones past the old mill." for i in range(150)))
    page.fill("#max-tokens", "16")
    page.set_input_files("#files", str(doc))
    expect(page.locator("#attachments")).to_contain_text("story.txt")
    page.fill("#question", "What did the river carry?")
    page.press("#question", "Enter")
    first = page.locator(".msg.assistant").last
    expect(first.locator(".meta")).to_contain_text("generated", timeout=180_000)
    # the bar showed the prefill's progress (it hides at the first answer token; what it said last is kept)
    last = page.locator("#prefill-box").get_attribute("data-last")
    done, total = last.split("prompt ")[1].split(" tokens")[0].replace(",", "").split(" / ")
    assert int(total) > 1500 and 0 < int(done) <= int(total)
    follow = ask(page, "And what stood by the river?")
    assert page.locator(".msg.assistant").count() == 2
    cached = int(follow.locator(".meta").inner_text().split("(")[1].split(" ")[0].replace(",", ""))
    assert cached > 1500  # the document came from the prefix cache


def test_stop_aborts_the_answer(page):
    page.fill("#max-tokens", "3000")
    page.fill("#question", "Write a very long story about a dragon.")
    page.press("#question", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".body")).not_to_be_empty(timeout=60_000)
    page.click("#stop")
    expect(reply.locator(".meta")).to_have_text("stopped")
    expect(page.locator("#send")).to_be_enabled()


def test_what_cannot_be_read_or_does_not_fit_is_refused_with_a_message(page, tmp_path):
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 8)
    page.set_input_files("#files", str(tmp_path / "image.bin"))
    expect(page.locator("#notice")).to_contain_text("binary file")
    (tmp_path / "huge.txt").write_text("many words in a very long document " * 1500)
    page.set_input_files("#files", str(tmp_path / "huge.txt"))
    expect(page.locator("#notice")).to_contain_text("the model's context is 4,096")
    page.fill("#question", "Summarize it.")
    page.press("#question", "Enter")
    expect(page.locator("#notice")).to_contain_text("Remove an attachment")
    assert page.locator(".msg").count() == 0  # nothing was sent
    if os.environ.get("MEGACTX_SCREENSHOT"):
        page.screenshot(path=os.environ["MEGACTX_SCREENSHOT"])
