#!/usr/bin/env python3
"""Put the CLIP backbone weights into the image at build time (used by docker/Dockerfile).

    fetch_weights.py MODE DEST [--context-dir DIR] [--sha256 HEX] [--url URL] [--cafile PEM]

MODE is the Dockerfile's CLIP_WEIGHTS build argument:
  fetch         download OpenAI's ViT-B/32 weights: open_clip's Hugging Face hub copy first, then
                OpenAI's own URL (reported 404 since October 2025, openai/CLIP issue #516), each
                checked against its pinned SHA-256. A network failure moves on to the next source; a
                file with the wrong hash stops the build. --sha256 picks the source with that hash;
                --url downloads from a mirror instead, whose file must have --sha256 or, without it,
                be one of OpenAI's known ViT-B/32 files.
  skip          put no weights in the image (the run then needs --weights PATH).
  local:PATH    copy PATH, a file in the build context under docker/weights/ (the only part of the
                context this step sees), e.g. local:docker/weights/ViT-B-32.pt; checked against
                --sha256 when given, else its hash is printed and recorded.

DEST keeps its name whatever was fetched (the program tells the formats apart by content). Next to
it go DEST.sha256 ("<hex>  <basename>") and DEST.source (where it came from), so a run can report
which weights it used. Standard library only: the image has no curl.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# OpenAI's CLIP ViT-B/32 weights files, by SHA-256: the same table as OPENAI_VIT_B32_SHA256 in
# app/backbone.py (this script runs in the build without the app package; a test checks that the two
# agree). Where each hash comes from is said there and in docker/README.md.
OPENAI_VIT_B32_SHA256 = {
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af":
        "OpenAI's ViT-B-32.pt (TorchScript archive)",
    "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31":
        "open_clip's hub copy timm/vit_base_patch32_clip_224.openai (open_clip_model.safetensors)",
}
# What `fetch` tries, in order: (URL, SHA-256 its file must have). The hub copy is the one open_clip's
# `openai` tag downloads, pinned to the revision whose file hash is known; OpenAI's own URL comes
# second because it has been reported returning 404 since October 2025 (openai/CLIP issue #516).
HUB_URL = ("https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/"
           "a6f597a30f7b82c51704746581f9a4e41421e878/open_clip_model.safetensors")
OPENAI_URL = ("https://openaipublic.azureedge.net/clip/models/"
              "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
SOURCES = [
    (HUB_URL, "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31"),
    (OPENAI_URL, "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
]
CONTEXT_PREFIX = "docker/weights/"
CHUNK = 1 << 20


def log(msg: str) -> None:
    print(f"fetch_weights: {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, cafile: str | None, attempts: int = 4) -> str:
    """Stream url into dest, hashing as it goes; retry on network errors, but not on an HTTP 4xx
    answer (a missing file stays missing). Returns the hex digest; raises the last OSError."""
    ctx = ssl.create_default_context()
    if cafile:  # in addition to the system CAs (a TLS-inspecting proxy's CA, say)
        ctx.load_verify_locations(cafile=cafile)
    attempt = 1
    while True:
        h = hashlib.sha256()
        done = 0
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "clip-weights-fetch/1"})
            with urllib.request.urlopen(req, timeout=120, context=ctx) as resp, dest.open("wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                next_report = 0.0
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if total and done / total >= next_report:
                        log(f"  {done / 2**20:7.1f} / {total / 2**20:.1f} MiB")
                        next_report += 0.25
                if total and done != total:
                    raise OSError(f"short read: {done} of {total} bytes")
            return h.hexdigest()
        except OSError as err:  # URLError, HTTPError and ssl errors are OSErrors
            dest.unlink(missing_ok=True)
            log(f"attempt {attempt}/{attempts} failed: {err}")
            if attempt == attempts or (isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500):
                raise
            time.sleep(min(30, 2**attempt))
            attempt += 1


def fetch(sources: list[tuple[str, str | None]], dest: Path, cafile: str | None) -> tuple[str, str]:
    """Download the first source that answers into dest; (url, sha256). Its file must have the
    source's SHA-256 (None: any of OPENAI_VIT_B32_SHA256), else the build stops here: a wrong file
    is never replaced by the next source silently."""
    tmp = dest.with_name(dest.name + ".part")
    failures = []
    for url, expected in sources:
        log(f"downloading {url}")
        try:
            got = download(url, tmp, cafile)
        except (OSError, ValueError) as err:  # ValueError: a malformed --url
            failures.append(f"{url}: {err}")
            continue
        if not (got == expected if expected else got in OPENAI_VIT_B32_SHA256):
            tmp.unlink(missing_ok=True)
            want = expected or "one of OpenAI's ViT-B/32 files: " + ", ".join(OPENAI_VIT_B32_SHA256)
            raise SystemExit(f"fetch_weights: SHA-256 mismatch for {url}: got {got}, expected {want}. "
                             "This is not the file the build expects; it was not kept.")
        os.replace(tmp, dest)
        return url, got
    raise SystemExit("fetch_weights: could not download the weights from any source:\n  "
                     + "\n  ".join(failures)
                     + "\nWithout network access to them, build with CLIP_WEIGHTS=local:docker/weights/FILE "
                     "(docker/README.md).")


def resolve_local(spec: str, context_dir: Path) -> Path:
    rel = spec.strip()
    if rel.startswith("./"):
        rel = rel[2:]
    if rel.startswith(CONTEXT_PREFIX):
        rel = rel[len(CONTEXT_PREFIX):]
    elif "/" in rel:
        raise SystemExit(
            f"fetch_weights: local:{spec}: the file must be in the build context under "
            f"{CONTEXT_PREFIX} (e.g. local:{CONTEXT_PREFIX}ViT-B-32.pt)"
        )
    src = (context_dir / rel).resolve()
    if context_dir.resolve() not in src.parents or not src.is_file():
        raise SystemExit(
            f"fetch_weights: local:{spec}: no such file in {CONTEXT_PREFIX} of the build context "
            f"(is it excluded by .dockerignore?)"
        )
    return src


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", help="fetch | skip | local:PATH")
    p.add_argument("dest", type=Path, help="where the weights go, e.g. /opt/weights/ViT-B-32.pt")
    p.add_argument("--context-dir", type=Path, default=Path("/tmp/weights-ctx"),
                   help="where docker/weights/ of the build context was copied")
    p.add_argument("--sha256", default="", help="expected SHA-256 (fetch: the pinned one of each source)")
    p.add_argument("--url", default="", help="download URL for fetch (default: the hub copy, then OpenAI's)")
    p.add_argument("--cafile", default="", help="extra CA bundle (PEM) for HTTPS, e.g. $PIP_CERT")
    a = p.parse_args(argv)

    mode = a.mode.strip()
    expected = a.sha256.strip().lower()
    if expected and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise SystemExit(f"fetch_weights: --sha256 {a.sha256!r} is not a 64-digit hex SHA-256")
    dest: Path = a.dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    if mode == "skip":
        log(f"CLIP_WEIGHTS=skip: no weights in the image; runs need --weights PATH ({dest} absent)")
        return 0

    if mode == "fetch":
        if a.url.strip():
            sources = [(a.url.strip(), expected or None)]
        else:
            sources = [(url, sha) for url, sha in SOURCES if not expected or sha == expected]
            if not sources:
                raise SystemExit(f"fetch_weights: --sha256 {expected} is not the hash of any default "
                                 f"source ({', '.join(sha for _, sha in SOURCES)}); give --url too")
        source, got = fetch(sources, dest, a.cafile.strip() or None)
    elif mode.startswith("local:"):
        src = resolve_local(mode[len("local:"):], a.context_dir)
        got = sha256_of(src)
        if expected and got != expected:
            raise SystemExit(f"fetch_weights: SHA-256 mismatch for {mode}: got {got}, expected {expected}")
        if not expected:
            note = OPENAI_VIT_B32_SHA256.get(
                got, "NOT a known OpenAI ViT-B/32 file: runs will need --allow-nonstandard-backbone")
            log(f"no CLIP_WEIGHTS_SHA256 given; {mode} has SHA-256 {got} ({note})")
        shutil.copyfile(src, dest)
        source = mode
    else:
        raise SystemExit(f"fetch_weights: CLIP_WEIGHTS={mode!r}: expected fetch, skip or local:PATH")

    dest.chmod(0o644)
    dest.with_name(dest.name + ".sha256").write_text(f"{got}  {dest.name}\n")
    dest.with_name(dest.name + ".source").write_text(source + "\n")
    log(f"{dest} ({dest.stat().st_size / 2**20:.1f} MiB) sha256 {got} OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
