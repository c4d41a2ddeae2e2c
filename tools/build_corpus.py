"""Build the multi-domain English corpus the default model is trained on.

Owns: fetching four Debian documentation packages with ``apt-get download``,
unpacking them with ``dpkg-deb -x`` (nothing is installed), extracting plain
text documents per domain, and a deterministic split by document into
train / validation / test / calibration.

Domains and sources (all Debian bookworm packages, see the model card for licences):
  python   python3.11-doc  reST sources (html/_sources/*.rst.txt)
  perl     perl-doc        POD files (usr/share/perl/5.36.0/pod/*.pod)
  kernel   linux-doc-6.1   kernel Documentation reST sources (html/_sources/*.rst.txt)
  fortunes fortunes, fortunes-min  quotes (one document = one fortune file chunk)

Usage:
  python tools/build_corpus.py --out data/corpus            # downloads into data/debs
The split is a pure function of each document's relative path (SHA-256), so
the same packages give the same split on any machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ["python3.11-doc", "perl-doc", "linux-doc-6.1", "fortunes", "fortunes-min"]
SPLITS = ("train", "validation", "test", "calibration")
# Fractions of documents (by hash bucket out of 1000) per split.
SPLIT_BUCKETS = {"validation": range(0, 25), "test": range(25, 50), "calibration": range(50, 65)}
MAX_TRAIN_BYTES_PER_DOMAIN = 9_000_000  # keeps domains roughly balanced (kernel docs are much larger)
DOC_SEPARATOR = "\n\n<|endoftext|>\n\n"


@dataclass(frozen=True)
class Document:
    domain: str
    key: str  # stable relative path (+ chunk index)
    text: str


def fetch_packages(deb_dir: Path) -> Path:
    """Download and unpack the Debian packages; return the unpack root.

    Raises:
        RuntimeError: when apt-get or dpkg-deb fails (e.g. no package index: run apt-get update).
    """
    deb_dir.mkdir(parents=True, exist_ok=True)
    root = deb_dir / "root"
    if not any(deb_dir.glob("*.deb")):
        result = subprocess.run(["apt-get", "download", *PACKAGES], cwd=deb_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download failed (try `apt-get update` first):\n{result.stderr}")
    root.mkdir(exist_ok=True)
    for deb in sorted(deb_dir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def python_docs(root: Path) -> list[Document]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    return [Document("python", str(p.relative_to(base)), _clean(p.read_text(errors="replace")))
            for p in sorted(base.rglob("*.rst.txt"))]


def kernel_docs(root: Path) -> list[Document]:
    base = root / "usr/share/doc/linux-doc-6.1/html/_sources"
    return [Document("kernel", str(p.relative_to(base)), _clean(p.read_text(errors="replace")))
            for p in sorted(base.rglob("*.rst.txt"))]


def perl_docs(root: Path) -> list[Document]:
    base = root / "usr/share/perl"
    return [Document("perl", str(p.relative_to(base)), _clean(p.read_text(errors="replace")))
            for p in sorted(base.rglob("*.pod"))]


def fortune_docs(root: Path, quotes_per_doc: int = 20) -> list[Document]:
    """Fortune files become documents of ``quotes_per_doc`` consecutive quotes."""
    base = root / "usr/share/games/fortunes"
    docs: list[Document] = []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        quotes = [_clean(q) for q in path.read_text(errors="replace").split("\n%\n")]
        quotes = [q for q in quotes if q and q != "%"]
        for start in range(0, len(quotes), quotes_per_doc):
            chunk = "\n\n".join(quotes[start:start + quotes_per_doc])
            docs.append(Document("fortunes", f"{path.relative_to(base)}#{start // quotes_per_doc}", chunk))
    return docs


def split_of(doc: Document) -> str:
    """Deterministic split from the document key's SHA-256."""
    bucket = int.from_bytes(hashlib.sha256(f"{doc.domain}/{doc.key}".encode()).digest()[:4], "big") % 1000
    for split, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    return "train"


def write_corpus(docs: list[Document], out: Path) -> dict:
    """Write ``out/<split>/<domain>.txt`` and return statistics."""
    stats: dict = {}
    by_key: dict[tuple[str, str], list[str]] = {}
    for doc in docs:
        if len(doc.text) < 200:
            continue
        by_key.setdefault((split_of(doc), doc.domain), []).append(doc.text)
    for (split, domain), texts in sorted(by_key.items()):
        if split == "train":
            kept, size = [], 0
            for text in texts:
                if size >= MAX_TRAIN_BYTES_PER_DOMAIN:
                    break
                kept.append(text)
                size += len(text.encode())
            texts = kept
        (out / split).mkdir(parents=True, exist_ok=True)
        body = DOC_SEPARATOR.join(texts)
        (out / split / f"{domain}.txt").write_text(body)
        stats.setdefault(split, {})[domain] = {"documents": len(texts), "bytes": len(body.encode())}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/corpus"))
    parser.add_argument("--debs", type=Path, default=Path("data/debs"))
    args = parser.parse_args()
    root = fetch_packages(args.debs)
    docs = python_docs(root) + perl_docs(root) + kernel_docs(root) + fortune_docs(root)
    stats = write_corpus(docs, args.out)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
