"""Where a run's files live: a local folder, or a prefix on object storage (``s3://bucket/prefix``, ``gs://…``).

Everything that names a place a run writes (the run folder, a step's folder, Ray's storage, the feature-net
cache) is a URI string: a plain path for a local folder, ``scheme://bucket/key`` for object storage. This
module is the one codec between those strings and pyarrow filesystems, so Ray Train, Ray Tune, Ray Data and
our own reads and writes all reach the same store the same way.

Two storage quirks are handled here, once:

- pyarrow's S3FileSystem ignores ``AWS_ENDPOINT_URL`` (apache/arrow#49643), and Ray builds its filesystem
  from the URI with pyarrow, so an S3-compatible store's endpoint must be passed explicitly: ``filesystem``
  reads ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` and gives it to pyarrow, and Ray gets that filesystem
  (``RunConfig(storage_filesystem=...)``), never the bare URI.
- Credentials are never passed explicitly: pyarrow then reads them from the standard AWS variables or files
  (for GCS, Application Default Credentials) on each node, so a pickled filesystem (Ray ships it to every
  worker) carries no secret.
- pyarrow's GcsFileSystem ignores ``STORAGE_EMULATOR_HOST``, the variable with which Google's own client
  libraries reach a GCS emulator; ``filesystem`` reads it the same way, so tests and local trials need no
  code path of their own.

Object stores have no rename, so a folder cannot appear complete in one step; the DAG instead makes a
step's manifest object the last thing it writes (``pipelines/dag.py``).
"""
from __future__ import annotations

import datetime
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from vaegan.config import ConfigError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names object storage rather than a local folder."""
    scheme, sep, _ = str(uri).partition("://")
    return bool(sep) and scheme in REMOTE_SCHEMES


def endpoint(uri: str | os.PathLike) -> str:
    """The endpoint the standard variables name for ``uri``'s store ("" for the cloud's own): for S3,
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; for GCS, ``STORAGE_EMULATOR_HOST``."""
    if _scheme(uri) == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return os.environ.get("STORAGE_EMULATOR_HOST", "")


def _scheme(uri: str | os.PathLike) -> str:
    return str(uri).partition("://")[0]


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem ``uri`` lives on and its path there (``bucket/key`` for object storage, an
    absolute path for a local folder)."""
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    path = uri.split("://", 1)[1].strip("/")
    if _scheme(uri) == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(endpoint(uri), region), path
    return _gcs(endpoint(uri)), path


@functools.cache
def _s3(endpoint_url: str, region: str | None) -> pafs.S3FileSystem:
    """One S3FileSystem per endpoint and region in a process. A short connect timeout and a few retries: an
    endpoint that does not answer fails in seconds, not after pyarrow's default minutes."""
    kwargs = {"endpoint_override": endpoint_url} if endpoint_url else {}
    return pafs.S3FileSystem(region=region or "us-east-1", connect_timeout=5, request_timeout=60,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3), **kwargs)


@functools.cache
def _gcs(emulator: str) -> pafs.GcsFileSystem:
    """One GcsFileSystem per endpoint in a process; an emulator (``host:port`` or ``http://host:port``) is
    reached anonymously, as Google's client libraries do. Retries end after 15 seconds instead of 15 minutes,
    so that an endpoint that does not answer fails about as fast as an S3 one."""
    retries = datetime.timedelta(seconds=15)
    if not emulator:
        return pafs.GcsFileSystem(retry_time_limit=retries)
    scheme, _, host = emulator.rpartition("://")
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http",
                              retry_time_limit=retries)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``uri`` with ``parts`` appended, as a URI of the same kind."""
    if not is_remote(uri):
        return str(Path(uri, *parts))
    return "/".join([str(uri).rstrip("/"), *parts])


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str | os.PathLike) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str | os.PathLike, text: str, durable: bool = True) -> None:
    """One object (or file) with ``text``; an object store's PUT replaces it whole, so a reader never sees
    half of it. Local files go through ``vaegan.atomic`` for the same guarantee (``durable``: fsynced too)."""
    if not is_remote(uri):
        from vaegan.atomic import atomic_file
        with atomic_file(uri, "w", durable) as f:
            f.write(text)
        return
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def upload(local: Path, uri: str) -> None:
    """Copy the file or folder ``local`` to ``uri`` (a folder's whole tree)."""
    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)


def delete(uri: str | os.PathLike) -> None:
    """Remove the object or the whole prefix ``uri``; nothing if it is not there."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        # Contents first: on GCS, delete_dir fails on a prefix with objects but no directory-marker object (one
        # written object by object), after deleting those objects. What is left then is a marker, if any.
        fs.delete_dir_contents(path, missing_dir_ok=True)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def local_view(uri: str | os.PathLike) -> Path:
    """A local path with ``uri``'s contents: the path itself for a local folder; for object storage a copy
    in this process's temporary folder, downloaded once. Only for what never changes once written (a
    complete step's folder, a cached feature net), since the copy is reused."""
    if not is_remote(uri):
        return Path(uri)
    return _downloaded(str(uri))


@functools.cache
def _downloaded(uri: str) -> Path:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    target = Path(_scratch()) / path
    # copy_files writes a folder's files but makes no folders, a file's folder included
    (target if info.type == pafs.FileType.Directory else target.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    use_threads=True)
    return target


@functools.cache
def _scratch() -> str:
    """This process's download folder, removed when it exits normally (a killed one leaves it to the OS's
    temporary-file cleanup, like any other temporary file)."""
    import atexit
    folder = tempfile.mkdtemp(prefix="vaegan-store-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def check_writable(uri: str, what: str) -> None:
    """That objects can be written under a remote ``uri`` (named ``what`` in messages): its endpoint answers,
    the credentials are accepted and the bucket exists. One line naming what is wrong, raised before any compute."""
    where = _check_bucket(uri, what)
    probe = join(uri, ".vaegan-write-check")
    try:
        write_text(probe, "")
        delete(probe)
    except OSError as err:
        raise ConfigError(f"{where} cannot be written: {_refusal(uri, err)}") from None


def check_readable(uri: str, what: str) -> None:
    """That a remote ``uri`` can be read and holds something: a file, or a prefix with objects under it."""
    where = _check_bucket(uri, what)
    fs, path = filesystem(uri)
    try:
        found = fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise ConfigError(f"{where}: {_refusal(uri, err)}") from None
    if not found:
        raise ConfigError(f"{where} does not exist; allowed: a Parquet file or a prefix of Parquet files or "
                          "images in an existing bucket")


def _check_bucket(uri: str, what: str) -> str:
    """That ``uri``'s bucket exists and the store answers and accepts the credentials; ``what`` and ``uri``
    (and the endpoint), as messages name them."""
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    where = f"{what} {uri!r}" + (f" at endpoint {endpoint(uri)}" if endpoint(uri) else "")
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise ConfigError(f"{where}: {_refusal(uri, err)}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{where}: bucket {bucket!r} does not exist; allowed: an existing bucket "
                          "(vaegan creates no buckets)")
    return where


# What each store says when it refuses credentials, and where its users set them and its endpoint.
_DENIED = {"s3": ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "UNRECOGNIZED_CLIENT"),
           "gs": ("PERMISSION_DENIED", "UNAUTHENTICATED")}
_CREDENTIALS = {"s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws",
                "gs": "Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's service account)"}
_ENDPOINTS = {"s3": "AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible store",
              "gs": "STORAGE_EMULATOR_HOST for a GCS emulator"}


def _refusal(uri: str, err: OSError) -> str:
    """What the store said, in one line, with what would be allowed instead."""
    store = "s3" if _scheme(uri) == "s3" else "gs"
    found = (re.search(r"AWS Error (\w+) during (\w+) operation", str(err))
             or re.search(r"google::cloud::Status\((\w+):.*?gcloud-cpp\.retry\.function=(\w+)", str(err)))
    code, operation = found.groups() if found else ("", "")
    if code in _DENIED[store]:
        return (f"the store refuses these credentials ({code} on {operation}); allowed: credentials that may "
                f"read and write the bucket, from {_CREDENTIALS[store]}")
    what = f"{code} on {operation}" if code else str(err).splitlines()[0]
    return f"the store cannot be reached ({what}); allowed: an endpoint that answers ({_ENDPOINTS[store]})"
