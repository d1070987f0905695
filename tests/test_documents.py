"""Attachments to text (megactx/server/documents.py): a repository .zip keeps its text files under their paths and
skips binaries and tool folders; a PDF's pages are marked; what has no text is refused with the reason."""
import io
import zipfile

import pytest

from megactx.server.documents import DocumentError, extract


def pdf_bytes(pages: list[str]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages
    matplotlib.rcParams["pdf.fonttype"] = 42
    out = io.BytesIO()
    with PdfPages(out) as pdf:
        for text in pages:
            fig = plt.figure(figsize=(4, 2))
            if text:
                fig.text(0.1, 0.5, text)
            pdf.savefig(fig)
            plt.close(fig)
    return out.getvalue()


def test_a_repository_zip_keeps_text_files_under_their_paths():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("repo/src/main.py", "print('hello')\n")
        z.writestr("repo/README.md", "# Title\n")
        z.writestr("repo/logo.png", b"\x89PNG\r\n\x1a\n\0\0\0")
        z.writestr("repo/.git/config", "[core]\n")
        z.writestr("repo/node_modules/x/index.js", "module.exports = 1\n")
    doc = extract(buf.getvalue(), "repo.zip")
    assert doc.text == "### repo/README.md\n# Title\n\n\n### repo/src/main.py\nprint('hello')\n"
    assert doc.files == 2 and sorted(doc.skipped) == ["repo/.git/config", "repo/logo.png",
                                                      "repo/node_modules/x/index.js"]


def test_pdf_pages_are_marked_and_a_pdf_without_text_is_refused():
    doc = extract(pdf_bytes(["First page words", "Second page words"]), "a.pdf")
    assert doc.pages == 2
    assert doc.text.index("--- page 1 ---") < doc.text.index("First page") < doc.text.index("--- page 2 ---") \
        < doc.text.index("Second page")
    with pytest.raises(DocumentError, match="no text layer"):
        extract(pdf_bytes(["", ""]), "scan.pdf")


def test_text_passes_and_binary_or_empty_is_refused():
    assert extract("héllo\n".encode(), "a.txt").text == "héllo\n"
    with pytest.raises(DocumentError, match="binary file"):
        extract(bytes(range(256)), "x.bin")
    with pytest.raises(DocumentError, match="empty"):
        extract(b"", "e.txt")
    with pytest.raises(DocumentError, match="not a readable .zip"):
        extract(b"PK\x03\x04garbage", "bad.zip")
