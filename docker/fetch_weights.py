#!/usr/bin/env python3
"""Put the CLIP backbone weights into the image at build time (used by docker/Dockerfile).

    fetch_weights.py MODE DEST [--context-dir DIR] [--sha256 HEX] [--url URL] [--cafile PEM]

MODE is the Dockerfile's CLIP_WEIGHTS build argument:
  fetch         download URL (default: OpenAI's ViT-B/32 checkpoint) and check its SHA-256
                (default: OpenAI's published hash, which is also part of the URL); any mismatch fails.
  skip          put no weights in the image (the run then needs --weights PATH).
  local:PATH    copy PATH, a file in the build context under docker/weights/ (the only part of the
                context this step sees), e.g. local:docker/weights/ViT-B-32.pt; checked against
                --sha256 when given, else its hash is printed and recorded.

Next to DEST it writes DEST.sha256 ("<hex>  <basename>") and DEST.source (where it came from), so a
run can report which weights it used. Standard library only: the image has no curl.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import ssl
import sys
import time
import urllib.request
from pathlib import Path

OPENAI_VIT_B32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
OPENAI_VIT_B32_URL = (
    "https://openaipublic.azureedge.net/clip/models/" + OPENAI_VIT_B32_SHA256 + "/ViT-B-32.pt"
)
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
    """Stream url into dest, hashing as it goes; retry on network errors. Returns the hex digest."""
    ctx = ssl.create_default_context()
    if cafile:  # in addition to the system CAs (a TLS-inspecting proxy's CA, say)
        ctx.load_verify_locations(cafile=cafile)
    last_err: Exception | None = None
    for attempt in range(1, attempts + 1):
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
        except (OSError, ValueError) as err:  # URLError and ssl errors are OSErrors
            last_err = err
            log(f"attempt {attempt}/{attempts} failed: {err}")
            if attempt < attempts:
                time.sleep(min(30, 2**attempt))
    raise SystemExit(f"fetch_weights: could not download {url}: {last_err}")


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
    p.add_argument("--sha256", default="", help="expected SHA-256 (fetch: defaults to OpenAI's)")
    p.add_argument("--url", default="", help="download URL for fetch (default: OpenAI's ViT-B/32)")
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
        url = a.url.strip() or OPENAI_VIT_B32_URL
        expected = expected or OPENAI_VIT_B32_SHA256
        tmp = dest.with_name(dest.name + ".part")
        log(f"downloading {url}")
        got = download(url, tmp, a.cafile.strip() or None)
        if got != expected:
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"fetch_weights: SHA-256 mismatch for {url}: got {got}, expected {expected}")
        os.replace(tmp, dest)
        source = url
    elif mode.startswith("local:"):
        src = resolve_local(mode[len("local:"):], a.context_dir)
        got = sha256_of(src)
        if expected and got != expected:
            raise SystemExit(f"fetch_weights: SHA-256 mismatch for {mode}: got {got}, expected {expected}")
        if not expected:
            note = "OpenAI ViT-B/32" if got == OPENAI_VIT_B32_SHA256 else "NOT OpenAI's ViT-B/32"
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
