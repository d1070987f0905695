"""Documents to text for the chat page: text and code files, PDFs (pypdf, pages marked) and .zip archives of a
repository (each text file under a header with its path; binaries and tool folders skipped).

What cannot become text is refused with the reason, in words a person can act on: a scanned PDF (pages with no
text layer), a binary file, an archive with no text file in it.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

SKIPPED_FOLDERS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache",
                   ".pytest_cache", ".tox", "dist", "build", ".idea", ".vscode", "target", ".next"}
MAX_FILE_BYTES = 8 << 20  # one member of an archive; larger ones are data, not something to read to a model


class DocumentError(ValueError):
    """The upload cannot be turned into text; the message says why."""


@dataclass
class Extracted:
    text: str
    files: int = 1
    pages: int | None = None
    skipped: list[str] = field(default_factory=list)


def looks_binary(data: bytes) -> bool:
    """NUL bytes in the first 8 KB, or not UTF-8: what git and grep treat as binary."""
    head = data[:8192]
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a character cut at the 8 KB boundary is not binary
    return False


def skipped_path(path: str) -> bool:
    """A path inside a folder that holds tools' output, not the repository's own text."""
    return any(part in SKIPPED_FOLDERS for part in path.replace("\\", "/").split("/")[:-1])


def pdf_text(data: bytes, name: str) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError) as e:
        raise DocumentError(f"{name}: not a readable PDF ({e})") from None
    if not any(p.strip() for p in pages):
        raise DocumentError(f"{name}: its {len(pages)} page(s) have no text layer (a scanned PDF?); run OCR on it "
                            f"first or paste the text")
    text = "\n\n".join(f"--- page {i} ---\n{p.strip()}" for i, p in enumerate(pages, 1))
    return Extracted(text, pages=len(pages))


def zip_text(data: bytes, name: str) -> Extracted:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise DocumentError(f"{name}: not a readable .zip archive") from None
    parts, skipped = [], []
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        path = info.filename
        if info.is_dir():
            continue
        if skipped_path(path) or info.file_size > MAX_FILE_BYTES:
            skipped.append(path)
            continue
        body = archive.read(info)
        if looks_binary(body):
            skipped.append(path)
            continue
        parts.append(f"### {path}\n{body.decode('utf-8', errors='replace')}")
    if not parts:
        raise DocumentError(f"{name}: the archive holds no text file ({len(skipped)} binary or skipped)")
    return Extracted("\n\n".join(parts), files=len(parts), skipped=skipped)


def extract(data: bytes, name: str) -> Extracted:
    """An uploaded file's bytes -> its text, by what the bytes are (the name's extension decides only between
    formats that both parse)."""
    if data[:5] == b"%PDF-":
        return pdf_text(data, name)
    if data[:4] == b"PK\x03\x04":
        return zip_text(data, name)
    if not data:
        raise DocumentError(f"{name}: the file is empty")
    if looks_binary(data):
        raise DocumentError(f"{name}: a binary file, not text; attach text, code, a PDF or a .zip of a repository")
    return Extracted(data.decode("utf-8", errors="replace"))
