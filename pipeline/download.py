"""Stage `download`: fetch the four MNIST IDX files into data/raw/, verified by SHA-256.

Sources come from `download.sources` in params.yaml and are tried in order for each file: HTTPS
mirrors first, then the copy of the `.gz` files committed under data/offline/, so a fresh clone runs
on a machine with no internet. The check is on the DECOMPRESSED bytes, so the outputs (and their
hashes in dvc.lock) are identical whichever source served them. A source that cannot be reached is
skipped for the remaining files, so a dead mirror costs one timeout, not four.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from io import BytesIO
from pathlib import Path

import requests
from tqdm import tqdm

from pipeline import io, quiet
from pipeline.config import CHECKSUMS_FILE, MNIST_FILES, RAW_DIR, DownloadParams, load_params
from pipeline.errors import DataError, run_stage, unanswered

log = logging.getLogger("pipeline.download")

_CHUNK = 1 << 16


class BadFileError(Exception):
    """The source answered, but not with the right file: try the next source for this file."""


def fetch(source: str, name: str, params: DownloadParams) -> bytes:
    """The compressed bytes of `name` from one source (an HTTPS base URL or a local folder). A source that
    answers wrongly raises `BadFileError`; one that cannot be reached, `requests.ConnectionError` or
    `requests.Timeout`; any other failure of a request, `requests.RequestException`."""
    if source.startswith("https://"):
        return _fetch_https(source.rstrip("/") + f"/{name}.gz", params)
    path = Path(source) / f"{name}.gz"
    try:
        if path.stat().st_size > params.max_bytes:
            raise BadFileError(f"{path} is larger than download.max_megabytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise BadFileError(f"{path} does not exist") from None
    except OSError as error:
        raise BadFileError(f"{path} cannot be read ({error.strerror})") from None


def _fetch_https(url: str, params: DownloadParams) -> bytes:
    timeout = params.timeout_seconds
    with requests.get(url, stream=True, timeout=(timeout, timeout), allow_redirects=True) as response:
        if not response.url.startswith("https://"):
            raise BadFileError(f"redirected to a non-HTTPS address {response.url}")
        if response.status_code != 200:
            raise BadFileError(f"HTTP {response.status_code}")
        declared = int(response.headers.get("Content-Length") or 0)
        if declared > params.max_bytes:
            raise BadFileError(f"{declared} bytes is over download.max_megabytes")
        content = bytearray()
        with tqdm(
            total=declared or None,
            unit="B",
            unit_scale=True,
            desc=url.rsplit("/", 1)[-1],
            disable=None,
            leave=False,
        ) as bar:
            for chunk in response.iter_content(_CHUNK):
                content += chunk
                if len(content) > params.max_bytes:
                    raise BadFileError("the download exceeds download.max_megabytes")
                bar.update(len(chunk))
        return bytes(content)


def read_checksums(path: Path = CHECKSUMS_FILE) -> dict[str, str]:
    """`name -> sha256` of the decompressed files, from a `sha256sum`-style file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        raise DataError(f"{path} is missing; restore it with `git checkout {path}`.") from None
    sums = {}
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.startswith("#"):
            parts = line.split()
            if len(parts) != 2:
                raise DataError(
                    f"{path} line {number} is not '<sha256>  <file name>'; restore it with `git checkout {path}`."
                )
            digest, name = parts
            sums[name.removeprefix("*")] = digest  # `sha256sum --binary` marks names with '*'
    if missing := [name for name in MNIST_FILES if name not in sums]:
        raise DataError(f"{path} has no checksum for {', '.join(missing)}; restore it with `git checkout {path}`.")
    return sums


def decompress_and_verify(compressed: bytes, expected_sha256: str, max_bytes: int) -> bytes:
    """Gunzip and check the SHA-256 of the content; `BadFileError` says why it is not the expected file."""
    try:
        with gzip.GzipFile(fileobj=BytesIO(compressed)) as handle:
            content = handle.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise BadFileError(f"not a valid gzip file ({error})") from None
    if len(content) > max_bytes:
        raise BadFileError("decompressed content exceeds download.max_megabytes")
    digest = hashlib.sha256(content).hexdigest()
    if digest != expected_sha256:
        raise BadFileError(f"wrong content (sha256 {digest[:12]}..., expected {expected_sha256[:12]}...)")
    return content


def download_all(
    params: DownloadParams, out_dir: Path = RAW_DIR, checksums: dict[str, str] | None = None
) -> dict[str, str]:
    """Write every MNIST file to `out_dir`; return which source served each one."""
    sums = checksums or read_checksums()
    down: dict[str, str] = {}  # source -> why it could not be reached: skipped for the remaining files
    served: dict[str, str] = {}
    with io.staged_outputs() as out:
        for name in MNIST_FILES:
            served[name], content = _first_good(name, sums[name], params, down)
            out.write_bytes(out_dir / name, content)
            log.info("%s: served by %s (%d bytes, sha256 verified)", name, served[name], len(content))
    return served


def _first_good(name: str, sha256: str, params: DownloadParams, down: dict[str, str]) -> tuple[str, bytes]:
    """The first source in `params.sources` that has the verified file, and the file's content."""
    failures: list[str] = []
    for source in params.sources:
        if source in down:
            failures.append(f"{source}: skipped, {down[source]} earlier")
            continue
        try:
            return source, decompress_and_verify(fetch(source, name, params), sha256, params.max_bytes)
        except (requests.ConnectionError, requests.Timeout) as error:  # skipped for the remaining files
            down[source] = unanswered(error)
            failures.append(f"{source}: {down[source]}")
            log.info("%s: %s is unreachable (%s); trying the next source", name, source, down[source])
        except (BadFileError, requests.RequestException) as error:  # may still have the next file
            reason = unanswered(error) if isinstance(error, requests.RequestException) else str(error)
            failures.append(f"{source}: {reason}")
            log.info("%s: %s failed (%s); trying the next source", name, source, reason)
    raise DataError(
        f"no source could provide {name}: "
        + "; ".join(failures)
        + ". Check your network or restore data/offline/ with `git checkout data/offline`."
    )


def main() -> None:
    """Read `download` from params.yaml and fetch the four files into data/raw/."""
    params = load_params()
    quiet.configure_logging()
    download_all(params.download)


if __name__ == "__main__":
    run_stage(main)
