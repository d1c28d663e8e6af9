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
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import requests
from tqdm import tqdm

from pipeline import io, quiet
from pipeline.config import CHECKSUMS_FILE, MNIST_FILES, RAW_DIR, DownloadParams, load_params
from pipeline.errors import DataError, run_stage, unanswered

log = logging.getLogger("pipeline.download")

_CHUNK = 1 << 16


class SourceDownError(Exception):
    """The source cannot be reached at all: skip it for the remaining files."""


class BadFileError(Exception):
    """The source answered, but not with the right file: try the next source for this file."""


@dataclass
class Fetcher:
    """Fetches `.gz` files from the configured sources, remembering which sources are down."""

    params: DownloadParams
    down: dict[str, str] = field(default_factory=dict)

    @property
    def max_bytes(self) -> int:
        return int(self.params.max_megabytes * 1_000_000)

    def fetch(self, source: str, name: str) -> bytes:
        """The compressed bytes of `name` from one source (an HTTPS base URL or a local folder)."""
        if source.startswith("https://"):
            return self._fetch_https(source.rstrip("/") + f"/{name}.gz")
        path = Path(source) / f"{name}.gz"
        try:
            if path.stat().st_size > self.max_bytes:
                raise BadFileError(f"{path} is larger than download.max_megabytes")
            return path.read_bytes()
        except FileNotFoundError:
            raise BadFileError(f"{path} does not exist") from None
        except OSError as error:
            raise BadFileError(f"{path} cannot be read ({error.strerror})") from None

    def _fetch_https(self, url: str) -> bytes:
        timeout = self.params.timeout_seconds
        try:
            with requests.get(url, stream=True, timeout=(timeout, timeout), allow_redirects=True) as response:
                if not response.url.startswith("https://"):
                    raise BadFileError(f"redirected to a non-HTTPS address {response.url}")
                if response.status_code != 200:
                    raise BadFileError(f"HTTP {response.status_code}")
                declared = int(response.headers.get("Content-Length") or 0)
                if declared > self.max_bytes:
                    raise BadFileError(f"{declared} bytes is over download.max_megabytes")
                chunks: list[bytes] = []
                received = 0
                with tqdm(
                    total=declared or None,
                    unit="B",
                    unit_scale=True,
                    desc=url.rsplit("/", 1)[-1],
                    disable=None,
                    leave=False,
                ) as bar:
                    for chunk in response.iter_content(_CHUNK):
                        received += len(chunk)
                        if received > self.max_bytes:
                            raise BadFileError("the download exceeds download.max_megabytes")
                        chunks.append(chunk)
                        bar.update(len(chunk))
                return b"".join(chunks)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise SourceDownError(unanswered(error)) from None
        except requests.RequestException as error:
            raise BadFileError(unanswered(error)) from None


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
    fetcher = Fetcher(params)
    served: dict[str, str] = {}
    with io.staged_outputs() as out:
        for name in MNIST_FILES:
            served[name] = _download_one(fetcher, name, sums[name], out_dir, out)
    return served


def _download_one(fetcher: Fetcher, name: str, sha256: str, out_dir: Path, out: io.StagedOutputs) -> str:
    """Stage one verified file from the first source that has it; return that source."""
    failures: list[str] = []
    for source in fetcher.params.sources:
        if source in fetcher.down:
            failures.append(f"{source}: skipped, {fetcher.down[source]} earlier")
            continue
        try:
            content = decompress_and_verify(fetcher.fetch(source, name), sha256, fetcher.max_bytes)
        except SourceDownError as error:
            fetcher.down[source] = str(error)
            failures.append(f"{source}: {error}")
            log.info("%s: %s is unreachable (%s); trying the next source", name, source, error)
            continue
        except BadFileError as error:
            failures.append(f"{source}: {error}")
            log.info("%s: %s failed (%s); trying the next source", name, source, error)
            continue
        out.write_bytes(out_dir / name, content)
        log.info("%s: served by %s (%d bytes, sha256 verified)", name, source, len(content))
        return source
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
