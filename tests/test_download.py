"""The download stage: verified files from the first source that works, against real (local) HTTPS mirrors.

Every mirror here is a real TLS server on 127.0.0.1 (tests/https_server.py); nothing touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from https_server import HTTPSServer, Reply, closed_port
from hypothesis import given, settings, strategies as st
from workspace import REPO

from pipeline.config import MNIST_FILES, DownloadParams, validate_params
from pipeline.download import BadFileError, decompress_and_verify, download_all, fetch, read_checksums
from pipeline.errors import ConfigError, DataError

OFFLINE = REPO / "data" / "offline"
SUMS_FILE = OFFLINE / "SHA256SUMS"
SUMS = read_checksums(SUMS_FILE)
GZ = {name: (OFFLINE / f"{name}.gz").read_bytes() for name in MNIST_FILES}
SMALL = "t10k-labels-idx1-ubyte"  # 4.5 kB compressed, 10008 bytes decompressed

HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Captive portal</body></html>"

StartServer = Callable[[], HTTPSServer]


def download_params(*sources: str | Path, timeout: float = 5.0, max_megabytes: float = 100) -> DownloadParams:
    """Download settings with the given sources (local folders as absolute paths, so cwd does not matter)."""
    return DownloadParams(
        sources=[str(source) for source in sources], timeout_seconds=timeout, max_megabytes=max_megabytes
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_complete_outputs(out_dir: Path, sums: dict[str, str] = SUMS) -> None:
    """The four files, each with its SHA-256 (of SHA256SUMS by default), and nothing else (no temporary files)."""
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(MNIST_FILES)
    for name in MNIST_FILES:
        assert sha256(out_dir / name) == sums[name], name


def stray_files(out_dir: Path) -> list[str]:
    """Leftovers of interrupted atomic writes."""
    return [p.name for p in out_dir.iterdir() if ".tmp" in p.name] if out_dir.exists() else []


def mirror(start: StartServer, reply: Callable[[str], Reply] | None = None, prefix: str = "/mnist/") -> HTTPSServer:
    """A started HTTPS server answering `<prefix><name>.gz` with `reply(name)` (404 for everything if None)."""
    server = start()
    if reply is not None:
        server.serve(prefix, MNIST_FILES, reply)
    return server


def good(name: str) -> Reply:
    return Reply(STAND_IN[name], content_type="application/gzip")


# --- checksums and verification -----------------------------------------------------------------


def test_read_checksums_of_the_repository() -> None:
    """SHA256SUMS covers exactly the four files, with well-formed digests."""
    sums = read_checksums(SUMS_FILE)
    assert set(sums) == set(MNIST_FILES)
    assert all(len(digest) == 64 and set(digest) <= set("0123456789abcdef") for digest in sums.values())


def test_checksums_are_of_the_decompressed_offline_files() -> None:
    """The committed .gz files are what SHA256SUMS describes (after gunzip)."""
    for name in MNIST_FILES:
        assert hashlib.sha256(gzip.decompress(GZ[name])).hexdigest() == SUMS[name]


def test_missing_or_incomplete_checksums_are_data_errors(tmp_path: Path) -> None:
    """A damaged SHA256SUMS stops the stage with a fix, not a KeyError later."""
    with pytest.raises(DataError, match="is missing"):
        read_checksums(tmp_path / "SHA256SUMS")
    partial = tmp_path / "partial"
    partial.write_text("".join(f"{SUMS[n]}  {n}\n" for n in MNIST_FILES[:3]), encoding="utf-8")
    with pytest.raises(DataError, match=f"no checksum for {MNIST_FILES[3]}"):
        read_checksums(partial)


def test_malformed_checksum_line_is_a_data_error(tmp_path: Path) -> None:
    """A mangled line (e.g. a merge-conflict marker) is reported as a DataError, not a ValueError traceback."""
    mangled = tmp_path / "SHA256SUMS"
    lines = [f"{SUMS[n]}  {n}" for n in MNIST_FILES]
    mangled.write_text("\n".join([*lines[:2], "=======", *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3 is not"):
        read_checksums(mangled)


def test_binary_mode_checksum_lines_are_read(tmp_path: Path) -> None:
    """`sha256sum --binary` writes `<digest> *<name>`; regenerating the file that way must still work."""
    binary = tmp_path / "SHA256SUMS"
    binary.write_text("".join(f"{SUMS[n]} *{n}\n" for n in MNIST_FILES), encoding="utf-8")
    assert read_checksums(binary) == SUMS


def test_decompress_and_verify_accepts_the_real_file() -> None:
    content = decompress_and_verify(GZ[SMALL], SUMS[SMALL], max_bytes=10008)
    assert len(content) == 10008
    assert content[:4] == b"\x00\x00\x08\x01"  # IDX magic of an unsigned-byte vector


@pytest.mark.parametrize(
    ("compressed", "max_bytes", "reason"),
    [
        pytest.param(gzip.compress(b"\x00" * 10008), 100_000, "wrong content", id="valid-gzip-of-other-bytes"),
        pytest.param(gzip.compress(GZ[SMALL]), 100_000, "wrong content", id="gzip-of-the-gzip"),
        pytest.param(HTML, 100_000, "not a valid gzip", id="html-page"),
        pytest.param(GZ[SMALL][: len(GZ[SMALL]) // 2], 100_000, "not a valid gzip", id="truncated"),
        pytest.param(GZ[SMALL][:-8], 100_000, "not a valid gzip", id="trailer-missing"),
        pytest.param(b"", 100_000, "wrong content", id="empty"),
        pytest.param(GZ[SMALL], 10007, "exceeds download.max_megabytes", id="one-byte-over-the-cap"),
        pytest.param(gzip.compress(bytes(5_000_000)), 1_000_000, "exceeds", id="gzip-bomb"),
    ],
)
def test_decompress_and_verify_rejects(compressed: bytes, max_bytes: int, reason: str) -> None:
    """Anything but the expected content is a BadFileError saying why (so the next source is tried)."""
    with pytest.raises(BadFileError, match=reason):
        decompress_and_verify(compressed, SUMS[SMALL], max_bytes)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


_damaged = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=2000).map(lambda tail: b"\x1f\x8b\x08\x00" + tail),  # gzip magic, garbage after
    st.integers(0, len(GZ[SMALL])).map(lambda n: GZ[SMALL][:n]),  # every truncation
    st.integers(0, len(GZ[SMALL]) - 1).map(lambda i: _flip(GZ[SMALL], i)),  # every single-byte corruption
)


@settings(max_examples=300, deadline=None)
@given(_damaged)
def test_verify_returns_the_right_content_or_bad_file_error(compressed: bytes) -> None:
    """Whatever a mirror sends, the result is the verified content or BadFileError, never another exception."""
    try:
        content = decompress_and_verify(compressed, SUMS[SMALL], 100_000)
    except BadFileError:
        return
    assert hashlib.sha256(content).hexdigest() == SUMS[SMALL]


# --- the offline folder -------------------------------------------------------------------------


def test_offline_source_writes_the_four_verified_files(tmp_path: Path) -> None:
    """With no mirror at all, the committed copy alone produces the exact outputs."""
    out_dir = tmp_path / "raw"
    served = download_all(download_params(OFFLINE), out_dir, SUMS)
    assert served == dict.fromkeys(MNIST_FILES, str(OFFLINE))
    assert_complete_outputs(out_dir)


def test_relative_local_folder_resolves_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """params.yaml says `data/offline/`; stages run from the repository root, checksums included."""
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "raw"
    served = download_all(download_params("data/offline/"), out_dir)  # default checksums: data/offline/SHA256SUMS
    assert set(served.values()) == {"data/offline/"}
    assert_complete_outputs(out_dir)


def test_the_stage_runs_offline_end_to_end(tmp_path: Path) -> None:
    """`python -m pipeline.download` in a fresh folder: exit 0 and the four verified files in data/raw/."""
    document = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    document["download"]["sources"] = [str(OFFLINE)]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    (tmp_path / "data" / "offline").mkdir(parents=True)
    shutil.copyfile(SUMS_FILE, tmp_path / "data" / "offline" / "SHA256SUMS")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.download"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_complete_outputs(tmp_path / "data" / "raw")


# --- real HTTPS mirrors -------------------------------------------------------------------------
# Served with four small stand-ins for the MNIST files (incompressible, 20 kB each): how sources are
# tried does not depend on what the files hold, and hashing the real 55 MB four times per test would
# take most of each test's time. The tests above and the stage's own test use the real files.

STAND_IN = {
    name: gzip.compress(np.random.default_rng(number).bytes(20_000), mtime=0) for number, name in enumerate(MNIST_FILES)
}
STAND_IN_SUMS = {name: hashlib.sha256(gzip.decompress(compressed)).hexdigest() for name, compressed in STAND_IN.items()}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local folder holding the stand-in `.gz` files, as data/offline/ holds the real ones."""
    folder = tmp_path_factory.mktemp("stand-ins")
    for name, compressed in STAND_IN.items():
        (folder / f"{name}.gz").write_bytes(compressed)
    return folder


def test_good_mirror_serves_all_four_files_identical_to_offline(
    tmp_path: Path,
    https_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    stand_ins: Path,
) -> None:
    """The first source that works is used for every file, and the outputs do not depend on which it was."""
    caplog.set_level(logging.INFO, logger="pipeline.download")
    server = mirror(https_server, good)
    url = server.url("/mnist/")

    download_all(download_params(stand_ins), tmp_path / "offline", STAND_IN_SUMS)
    caplog.clear()
    served = download_all(download_params(url, stand_ins), tmp_path / "mirror", STAND_IN_SUMS)

    assert served == dict.fromkeys(MNIST_FILES, url)
    assert server.requests == [f"/mnist/{name}.gz" for name in MNIST_FILES]
    served_lines = [message for message in caplog.messages if "served by" in message]
    assert [line.split(":", 1)[0] for line in served_lines] == list(MNIST_FILES)
    assert all(f"served by {url} " in line for line in served_lines)
    assert_complete_outputs(tmp_path / "mirror", STAND_IN_SUMS)
    for name in MNIST_FILES:
        assert (tmp_path / "mirror" / name).read_bytes() == (tmp_path / "offline" / name).read_bytes()


def test_base_url_without_trailing_slash(tmp_path: Path, https_server: StartServer) -> None:
    """`https://host/mnist` and `https://host/mnist/` name the same folder."""
    server = mirror(https_server, good)
    served = download_all(download_params(server.url("/mnist")), tmp_path, STAND_IN_SUMS)
    assert set(served.values()) == {server.url("/mnist")}
    assert server.requests == [f"/mnist/{name}.gz" for name in MNIST_FILES]


def _swapped(name: str) -> Reply:
    """A real MNIST .gz, but of another file: valid gzip, wrong content."""
    return good(MNIST_FILES[(MNIST_FILES.index(name) + 1) % len(MNIST_FILES)])


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        pytest.param(lambda name: Reply(HTML, content_type="text/html"), "not a valid gzip", id="html-200"),
        pytest.param(
            lambda name: Reply(STAND_IN[name][: len(STAND_IN[name]) // 2]), "not a valid gzip", id="truncated-gzip"
        ),
        pytest.param(_swapped, "wrong content", id="wrong-bytes"),
        pytest.param(None, "HTTP 404", id="not-found"),
        pytest.param(lambda name: Reply(b"oops", status=500, content_type="text/plain"), "HTTP 500", id="server-error"),
    ],
)
def test_mirror_answering_wrongly_falls_over_to_the_next_mirror(
    tmp_path: Path,
    https_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    reply: Callable[[str], Reply] | None,
    reason: str,
    stand_ins: Path,
) -> None:
    """A mirror that answers, but badly, is skipped for that file only (it may have the next one)."""
    caplog.set_level(logging.INFO, logger="pipeline.download")
    bad = mirror(https_server, reply)
    backup = mirror(https_server, good)

    served = download_all(
        download_params(bad.url("/mnist/"), backup.url("/mnist/"), stand_ins), tmp_path, STAND_IN_SUMS
    )

    assert served == dict.fromkeys(MNIST_FILES, backup.url("/mnist/"))
    assert_complete_outputs(tmp_path, STAND_IN_SUMS)
    assert bad.requests == [f"/mnist/{name}.gz" for name in MNIST_FILES]  # tried once per file, not marked down
    failures = [message for message in caplog.messages if "failed" in message]
    assert len(failures) == 4
    assert all(bad.url("/mnist/") in message and reason in message for message in failures)


def test_slow_mirror_times_out_once_and_is_skipped_afterwards(
    tmp_path: Path,
    https_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    stand_ins: Path,
) -> None:
    """A mirror that never answers costs one timeout, not one per file."""
    caplog.set_level(logging.INFO, logger="pipeline.download")
    slow = mirror(https_server, lambda name: Reply(STAND_IN[name], delay=5))

    started = time.monotonic()
    served = download_all(download_params(slow.url("/mnist/"), stand_ins, timeout=0.5), tmp_path, STAND_IN_SUMS)
    elapsed = time.monotonic() - started

    assert served == dict.fromkeys(MNIST_FILES, str(stand_ins))
    assert_complete_outputs(tmp_path, STAND_IN_SUMS)
    assert slow.requests == [f"/mnist/{MNIST_FILES[0]}.gz"]
    assert [m for m in caplog.messages if "unreachable" in m] == [
        f"{MNIST_FILES[0]}: {slow.url('/mnist/')} is unreachable (timed out); trying the next source"
    ]
    assert elapsed < 5, f"took {elapsed:.1f}s: the slow mirror was waited for more than once"


def test_dead_mirror_is_tried_once_then_skipped(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stand_ins: Path,
) -> None:
    """Nothing listening on the port: refused at once, and not retried for the three other files."""
    caplog.set_level(logging.INFO, logger="pipeline.download")
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with closed_port() as port:
        dead = f"https://127.0.0.1:{port}/mnist/"
        started = time.monotonic()
        served = download_all(download_params(dead, stand_ins, timeout=2), tmp_path, STAND_IN_SUMS)
        elapsed = time.monotonic() - started

    assert served == dict.fromkeys(MNIST_FILES, str(stand_ins))
    assert_complete_outputs(tmp_path, STAND_IN_SUMS)
    unreachable = [m for m in caplog.messages if "unreachable" in m]
    assert unreachable == [f"{MNIST_FILES[0]}: {dead} is unreachable (connection refused); trying the next source"]
    assert elapsed < 5


def test_dead_mirror_is_listed_as_skipped_when_a_later_file_fails(tmp_path: Path, https_server: StartServer) -> None:
    """The final error explains every source, including the one skipped because it was down earlier."""
    partial = https_server()
    partial.serve("/mnist/", MNIST_FILES[:1], good)  # only the first file; 404 for the rest
    with closed_port() as port:
        dead = f"https://127.0.0.1:{port}/mnist/"
        with pytest.raises(DataError) as caught:
            download_all(download_params(dead, partial.url("/mnist/")), tmp_path, STAND_IN_SUMS)

    message = str(caught.value)
    assert message.startswith(f"no source could provide {MNIST_FILES[1]}: ")
    assert f"{dead}: skipped, connection refused earlier" in message
    assert f"{partial.url('/mnist/')}: HTTP 404" in message
    # the four files change together: the verified first one is not written without the others
    assert list(tmp_path.iterdir()) == []


def test_untrusted_certificate_is_not_accepted(
    tmp_path: Path,
    https_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    stand_ins: Path,
) -> None:
    """TLS verification is on: a mirror whose certificate is not trusted is not used, even with the right files."""
    server = mirror(https_server, good)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())  # the public CAs only, not our own
    served = download_all(download_params(server.url("/mnist/"), stand_ins), tmp_path, STAND_IN_SUMS)
    assert served == dict.fromkeys(MNIST_FILES, str(stand_ins))
    assert_complete_outputs(tmp_path, STAND_IN_SUMS)


def test_size_cap_applies_to_the_download_itself(https_server: StartServer) -> None:
    """A mirror declaring a huge body is refused before it is read into memory."""
    server = https_server()
    server.routes["/big/t10k-labels-idx1-ubyte.gz"] = Reply(bytes(30_000))
    params = download_params(server.url("/big/"), max_megabytes=0.02)
    with pytest.raises(BadFileError, match=r"over download\.max_megabytes"):
        fetch(server.url("/big/"), "t10k-labels-idx1-ubyte", params)


def test_every_source_failing_lists_each_with_its_reason(tmp_path: Path, https_server: StartServer) -> None:
    """When nothing works, one DataError says what every source did, and no file is left behind."""
    html = mirror(https_server, lambda name: Reply(HTML, content_type="text/html"))
    truncated = mirror(https_server, lambda name: Reply(STAND_IN[name][:1000]))
    wrong = mirror(https_server, _swapped)
    missing = mirror(https_server, None)
    slow = mirror(https_server, lambda name: Reply(STAND_IN[name], delay=5))
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    out_dir = tmp_path / "raw"
    out_dir.mkdir()

    with closed_port() as port:
        dead = f"https://127.0.0.1:{port}/mnist/"
        sources = [dead, html.url("/mnist/"), truncated.url("/mnist/"), wrong.url("/mnist/")]
        sources += [missing.url("/mnist/"), slow.url("/mnist/"), str(empty_folder)]
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            download_all(download_params(*sources, timeout=0.5), out_dir, STAND_IN_SUMS)
        elapsed = time.monotonic() - started

    message = str(caught.value)
    expected = {
        dead: "connection refused",
        html.url("/mnist/"): "not a valid gzip",
        truncated.url("/mnist/"): "not a valid gzip",
        wrong.url("/mnist/"): "wrong content",
        missing.url("/mnist/"): "HTTP 404",
        slow.url("/mnist/"): "timed out",
        str(empty_folder): "does not exist",
    }
    reasons = dict(part.split(": ", 1) for part in message.split(": ", 1)[1].split(". Check")[0].split("; "))
    assert reasons.keys() == expected.keys()
    for source, reason in expected.items():
        assert reason in reasons[source], (source, reasons[source])
    assert "Check your network" in message
    assert list(out_dir.iterdir()) == []  # no target file, no temporary file
    assert elapsed < 5


def test_existing_output_is_untouched_when_every_source_fails(tmp_path: Path, https_server: StartServer) -> None:
    """A failed run keeps the previous (good) output instead of truncating or half-replacing it."""
    broken = mirror(https_server, lambda name: Reply(STAND_IN[name][: len(STAND_IN[name]) // 2]))
    out_dir = tmp_path / "raw"
    out_dir.mkdir()
    previous = out_dir / MNIST_FILES[0]
    previous.write_bytes(b"the output of an earlier, successful run")

    with pytest.raises(DataError):
        download_all(download_params(broken.url("/mnist/"), tmp_path / "nowhere"), out_dir, STAND_IN_SUMS)

    assert previous.read_bytes() == b"the output of an earlier, successful run"
    assert [p.name for p in out_dir.iterdir()] == [MNIST_FILES[0]]
    assert stray_files(out_dir) == []


def test_plain_http_source_is_rejected_by_the_config() -> None:
    """HTTPS only: a plain-http mirror is refused before any download is attempted."""
    document = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    document["download"]["sources"] = ["http://127.0.0.1:8000/mnist/", "data/offline/"]
    with pytest.raises(ConfigError, match=r"download\.sources = .*'http://127\.0\.0\.1:8000/mnist/'.*https://"):
        validate_params(document)
