"""Fetch the frozen networks' public weights: download, verify, convert once, cache.

The training objective and the evaluation need four frozen networks whose weights live in four
different places, as PyTorch files. A user should not have to find, check and convert them by hand,
so `python -m softvq_jax.pretrained fetch` (and `main` on the first run when
`config.pretrained.auto_fetch` is set) does it:

  network (config.pretrained.*)   source                                             cache file
  lpips         LPIPS-VGG16        torchvision vgg16-397923af.pth + lpips v0.1 vgg.pth lpips_vgg16_v0.1.safetensors
  dino          DINO ViT-S/16      facebookresearch/dino dino_deitsmall16_pretrain.pth dino_vits16.safetensors
  repa_teacher  DINOv2 ViT-L/14    timm/vit_large_patch14_dinov2.lvd142m (HF hub)     dinov2_vitl14_lvd142m.safetensors
  inception     FID Inception-v3   pytorch-fid pt_inception-2015-12-05-6726825d.pth   fid_inception.safetensors

Each download goes to `<downloads>/<name>.part` (resumed with an HTTP Range request after a broken
connection, restarted when the server ignores the range), is checked against its expected size and
SHA-256, converted with the existing converters (`softvq_jax/convert/`; reading a `.pth` needs
torch: `pip install -e .[convert]`), strictly loaded into the model it is for, and only then moved
into the cache under its final name with an atomic rename. A crash, a corrupt download or a failed
conversion therefore never leaves a file under a cache name; the objective finds exactly the files
that were completely verified. One lock file per network serialises processes on one host (8 GPU
processes of one node starting together download once).

`cache_dir` ("" = $XDG_CACHE_HOME/softvq_jax or ~/.cache/softvq_jax) may be a gs:// URL shared by
the hosts of a pod: downloads and conversion then happen in the local user cache and the result is
uploaded; readers copy it to the local cache once (the loaders read local files).

Tests point the table at a loopback server with `SOFTVQ_PRETRAINED_SOURCES=<json file>` (or the
`sources=` argument): {download key: {"url": ..., "size": ..., "sha256": ...}}, keys as in
`DOWNLOADS`.

This module imports only the standard library at import time (main's pre-flight uses it before
anything heavy); converters, jax and torch are imported when a conversion runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Mapping

SOURCES_ENV = "SOFTVQ_PRETRAINED_SOURCES"
USER_AGENT = "softvq_jax-fetch/0.1"
_CHUNK = 1 << 20
_RETRY_DELAYS_S = (0.0, 2.0, 5.0, 10.0, 30.0)  # before attempts 2, 3, ...


@dataclasses.dataclass(frozen=True)
class Download:
  """One public file. Verification: `size` and `sha256` when known; `hub_sha256`: the expected
  digest is the one the server publishes for the file (Hugging Face's `X-Linked-Etag` is the
  SHA-256 of an LFS file) and the download fails when it publishes none."""
  url: str
  filename: str
  size: int | None = None
  sha256: str | None = None
  hub_sha256: bool = False


# Canonical sources. Provenance of the pinned digests (the stored public sources searched while
# writing this): torchvision names its files with the first 8 hex digits of their SHA-256; the full
# digest and size of vgg16-397923af.pth are listed in a public model manifest
# (sha256 397923af8e79..., 553433881 bytes) and agree with that prefix. The full digest of
# pytorch-fid's file (prefix 6726825d, as its name carries) is taken from a public record of the
# same file as mirrored by torch-fidelity, whose digest starts with the same 8 hex digits; its size
# was not found. The lpips v0.1 vgg heads were hashed from the copy inside the lpips 0.1.4 wheel
# (the repository file it is packaged from). For dino_deitsmall16_pretrain.pth no size or digest
# was found in any stored source: it is verified by the strict load into ViT-S/16 only, and its
# digest is recorded in the cache's .json sidecar (and printed) so it can be pinned here.
# timm's DINOv2-L is checked against the SHA-256 and size the Hugging Face hub publishes.
DOWNLOADS: dict[str, Download] = {
    "vgg16": Download(
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        filename="vgg16-397923af.pth", size=553_433_881,
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"),
    "lpips_vgg_heads": Download(
        url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/"
            "weights/v0.1/vgg.pth",
        filename="lpips_v0.1_vgg.pth", size=7289,
        sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
    "dino_vits16": Download(
        url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
            "dino_deitsmall16_pretrain.pth",
        filename="dino_deitsmall16_pretrain.pth"),
    "dinov2_vitl14": Download(
        url="https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m/resolve/main/"
            "model.safetensors",
        filename="vit_large_patch14_dinov2.lvd142m.safetensors", hub_sha256=True),
    "fid_inception": Download(
        url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
        filename="pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),
}


@dataclasses.dataclass(frozen=True)
class Network:
  """A frozen network: its `config.pretrained` field, cache file and the downloads it is made of."""
  name: str
  title: str
  file: str
  downloads: tuple[str, ...]
  needs_torch: bool  # its sources are PyTorch pickles


NETWORKS: dict[str, Network] = {
    "lpips": Network("lpips", "LPIPS-VGG16 (torchvision VGG16 + lpips v0.1 heads)",
                     "lpips_vgg16_v0.1.safetensors", ("vgg16", "lpips_vgg_heads"), True),
    "dino": Network("dino", "DINO ViT-S/16 (discriminator backbone)", "dino_vits16.safetensors",
                    ("dino_vits16",), True),
    "repa_teacher": Network("repa_teacher", "DINOv2 ViT-L/14 LVD-142M (REPA teacher)",
                            "dinov2_vitl14_lvd142m.safetensors", ("dinov2_vitl14",), False),
    "inception": Network("inception", "FID Inception-v3 (pytorch-fid)", "fid_inception.safetensors",
                         ("fid_inception",), True),
}


class FetchError(RuntimeError):
  """A fetch that cannot complete; the message says what is missing and what to do."""


class OfflineError(FetchError):
  """The server cannot be reached at all (no network, DNS, proxy)."""


class ChecksumError(FetchError):
  """A download whose size or SHA-256 is not the expected one (it was deleted)."""


# ------------------------------------------------------------------------------------------------
# Where things live.
# ------------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
  return "://" in str(path)


def user_cache_dir() -> str:
  """$XDG_CACHE_HOME/softvq_jax, else ~/.cache/softvq_jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "softvq_jax")


def resolve_cache_dir(cache_dir: str | None = "") -> str:
  """`config.pretrained.cache_dir` with "" meaning the user cache directory."""
  cache_dir = str(cache_dir or "")
  if not cache_dir:
    return user_cache_dir()
  return cache_dir if is_remote(cache_dir) else os.path.abspath(os.path.expanduser(cache_dir))


def cache_dir_of(pretrained_config) -> str:
  get = getattr(pretrained_config, "get", None)
  return resolve_cache_dir(get("cache_dir", "") if get else "")


def downloads_dir(cache_dir: str) -> str:
  """Local folder for partial and raw downloads (always local: resuming appends to a file)."""
  cache_dir = resolve_cache_dir(cache_dir)
  return os.path.join(user_cache_dir() if is_remote(cache_dir) else cache_dir, "downloads")


def cache_file(name: str, cache_dir: str) -> str:
  """The cache path of a network's converted file (may be gs://)."""
  return _join(resolve_cache_dir(cache_dir), NETWORKS[name].file)


def _join(base: str, name: str) -> str:
  return base.rstrip("/") + "/" + name if is_remote(base) else os.path.join(base, name)


def _local_mirror(remote_path: str) -> str:
  digest = hashlib.sha1(remote_path.rsplit("/", 1)[0].encode()).hexdigest()[:12]
  return os.path.join(user_cache_dir(), "remote", digest, remote_path.rsplit("/", 1)[1])


def cached(name: str, cache_dir: str = "") -> str | None:
  """Local path of `name`'s converted file if the cache has it, else None. A gs:// cache is
  mirrored into the local user cache on first use (the loaders read local files)."""
  path = cache_file(name, cache_dir)
  if not is_remote(path):
    return path if os.path.isfile(path) else None
  from etils import epath  # pylint: disable=import-outside-toplevel
  remote = epath.Path(path)
  if not remote.exists():
    return None
  local = _local_mirror(path)
  size = remote.stat().length
  if not (os.path.isfile(local) and os.path.getsize(local) == size):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with remote.open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(tmp, local)
  return local


def load_sources(sources: Mapping[str, Mapping] | str | None = None) -> dict[str, Download]:
  """DOWNLOADS with overrides from `sources` (a dict or a JSON file), else from $SOFTVQ_PRETRAINED_SOURCES."""
  if sources is None:
    sources = os.environ.get(SOURCES_ENV) or None
  if isinstance(sources, str):
    with open(sources, encoding="utf-8") as f:
      sources = json.load(f)
  table = dict(DOWNLOADS)
  for key, override in (sources or {}).items():
    if key not in table:
      raise ValueError(f"{SOURCES_ENV}: unknown download {key!r}; known: {sorted(table)}")
    table[key] = dataclasses.replace(table[key], **dict(override))
  return table


def _mib(n: int | None) -> str:
  return "size unknown" if n is None else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def describe(name: str, cache_dir: str = "", sources=None) -> list[str]:
  """One line per source file of `name`: URL, where a manual copy goes, size and digest."""
  table = load_sources(sources)
  dl = downloads_dir(cache_dir)
  lines = []
  for key in NETWORKS[name].downloads:
    d = table[key]
    digest = (f"sha256 {d.sha256}" if d.sha256 else
              "sha256 as published by the hub" if d.hub_sha256 else "no published sha256")
    lines.append(f"{d.url}\n      -> {os.path.join(dl, d.filename)} ({_mib(d.size)}, {digest})")
  return lines


def manual_instructions(names: Iterable[str], cache_dir: str = "", sources=None) -> str:
  """What to do without network access: the files, their sources, and where to put them."""
  names = list(names)
  lines = []
  for n in names:
    lines.append(f"  {n} ({NETWORKS[n].title}):")
    lines += [f"    {line}" for line in describe(n, cache_dir, sources)]
  return ("Without network access, download these on another machine, put them at the paths "
          "shown and run `python -m softvq_jax.pretrained fetch --only=" + ",".join(names) +
          (f" --cache_dir={cache_dir}" if cache_dir else "") + "` here (it verifies and converts "
          "them offline):\n" + "\n".join(lines) + "\nOr copy the converted files of another "
          "machine's cache (" + ", ".join(NETWORKS[n].file for n in names) + ") into " +
          resolve_cache_dir(cache_dir) + ", or set config.pretrained.<name>=PATH to your own "
          "copies.")


# ------------------------------------------------------------------------------------------------
# Downloading.
# ------------------------------------------------------------------------------------------------


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
  """Keeps the headers of every redirect: Hugging Face puts a file's SHA-256 and size
  (X-Linked-Etag / X-Linked-Size) on the redirect, not on the CDN response that follows it."""

  def __init__(self):
    super().__init__()
    self.headers = []

  def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
    self.headers.append(headers)
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _published(header_sets) -> dict:
  """{"sha256": ..., "size": ...} as published by a hub in X-Linked-Etag / X-Linked-Size."""
  out = {}
  for headers in header_sets:
    etag = (headers.get("X-Linked-Etag") or "").strip()
    etag = etag[2:] if etag.startswith("W/") else etag
    etag = etag.strip('"').lower()
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
      out["sha256"] = etag
    size = headers.get("X-Linked-Size")
    if size and size.strip().isdigit():
      out["size"] = int(size)
  return out


def _content_range(value: str | None) -> tuple[int | None, int | None]:
  """'bytes 100-199/1000' -> (100, 1000)."""
  try:
    unit, rng = value.split(" ", 1)
    start, total = rng.split("-", 1)[0], rng.split("/", 1)[1]
    return int(start), (None if total == "*" else int(total))
  except (AttributeError, ValueError, IndexError):
    return None, None


def sha256_of(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _verify(d: Download, path: str, published: Mapping) -> str:
  """Size and SHA-256 of a finished download against the table / the hub; returns the digest."""
  size = os.path.getsize(path)
  want_size = d.size if d.size is not None else published.get("size")
  if want_size is not None and size != want_size:
    raise ChecksumError(f"{d.url}: downloaded {size} bytes, expected {want_size}")
  digest = sha256_of(path)
  want = d.sha256 or (published.get("sha256") if d.hub_sha256 else None)
  if d.hub_sha256 and not want:
    raise FetchError(f"{d.url}: the server published no SHA-256 (X-Linked-Etag) to verify the "
                     "download against; download it yourself and set the config.pretrained field")
  if want and digest != want.lower():
    raise ChecksumError(f"{d.url}: SHA-256 {digest} of the {size}-byte download is not the "
                        f"expected {want}")
  return digest


def download(d: Download, dest_dir: str, *, timeout: float = 30.0, max_attempts: int = 5,
             report: Callable[[str], None] = lambda msg: None) -> tuple[str, str]:
  """Downloads `d` into `dest_dir/d.filename`, verified; returns (path, sha256).

  The bytes go to `<filename>.part` first. A broken connection is retried up to `max_attempts`
  times, resuming with `Range: bytes=<have>-` (restarting from zero when the server answers 200
  instead of 206). A size or digest mismatch deletes the partial file and raises ChecksumError;
  an unreachable server raises OfflineError. A verified earlier download is reused (its digest is
  remembered in `<filename>.sha256`); a file put there by hand is verified like a download.
  """
  os.makedirs(dest_dir, exist_ok=True)
  final = os.path.join(dest_dir, d.filename)
  stamp = final + ".sha256"
  if os.path.isfile(final):
    known = open(stamp, encoding="utf-8").read().strip() if os.path.isfile(stamp) else None
    if known and (not d.sha256 or known == d.sha256):
      return final, known
    if d.sha256 or d.size is not None:  # placed by hand: check what can be checked offline
      try:
        digest = _verify(dataclasses.replace(d, hub_sha256=False), final, {})
      except ChecksumError as e:
        raise ChecksumError(f"{final} is not the expected file ({e}); delete it and fetch "
                            "again") from None
      return final, digest
    report(f"{final}: no published size or SHA-256 to check it against; it is checked by the "
           "strict conversion only")
    return final, sha256_of(final)

  part = final + ".part"
  published: dict = {}
  host = urllib.parse.urlsplit(d.url).netloc
  attempt = 0
  while True:
    attempt += 1
    if attempt > 1:
      time.sleep(_RETRY_DELAYS_S[min(attempt - 2, len(_RETRY_DELAYS_S) - 1)])
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
      headers["Range"] = f"bytes={offset}-"
    redirects = _RecordingRedirects()
    try:
      resp = urllib.request.build_opener(redirects).open(
          urllib.request.Request(d.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
      published.update(_published(redirects.headers + [e.headers]))
      e.close()
      if e.code == 416 and offset:  # nothing left to send: the partial file is complete (or junk)
        break
      if e.code in (408, 429, 500, 502, 503, 504) and attempt < max_attempts:
        report(f"{d.url}: HTTP {e.code}; retrying")
        continue
      raise FetchError(f"{d.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      if attempt < max_attempts and offset:  # it worked before: a transient failure
        report(f"{d.url}: {reason}; retrying")
        continue
      raise OfflineError(f"cannot reach {host} ({reason})") from None
    with resp:
      published.update(_published(redirects.headers + [resp.headers]))
      length = resp.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else None
      if resp.status == 206 and offset:  # resumed
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:  # not the range asked for: start again from byte 0
          report(f"{d.url}: the server answered bytes from {start}, not {offset}; restarting")
          os.remove(part)
          continue
        mode = "ab"
      elif resp.status == 200:  # a fresh download, or a server that does not resume
        if offset:
          report(f"{d.url}: the server does not resume; restarting from byte 0")
        offset, mode = 0, "wb"
      else:
        raise FetchError(f"{d.url}: unexpected HTTP status {resp.status}")
      have, next_report, broken = offset, 0.0, None
      with open(part, mode) as f:
        while True:
          try:
            chunk = resp.read(_CHUNK)
          except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            broken = e
            break
          if not chunk:
            break
          f.write(chunk)
          have += len(chunk)
          if total and have / total >= next_report:
            report(f"{d.filename}: {have / 2**20:.0f} / {total / 2**20:.0f} MiB")
            next_report = have / total + 0.1
    if broken is not None or (total is not None and have < total):
      why = broken if broken is not None else f"the server sent {have} of {total} bytes"
      if attempt < max_attempts:
        report(f"{d.url}: the connection broke at byte {have} ({why!r}); resuming")
        continue
      raise FetchError(f"{d.url}: the download broke {attempt} times (last at byte {have}: "
                       f"{why!r}); run the fetch again to resume it")
    break
  try:
    digest = _verify(d, part, published)
  except ChecksumError as e:
    os.remove(part)
    raise ChecksumError(f"{e}. The download was deleted and nothing was cached; run the fetch "
                        "again (a persistent mismatch means the file changed at its source)") from None
  except FetchError:
    os.remove(part)
    raise
  os.replace(part, final)
  with open(stamp, "w", encoding="utf-8") as f:
    f.write(digest)
  return final, digest


# ------------------------------------------------------------------------------------------------
# Conversion: each writes `out` (a .safetensors) after a strict load into the model it is for.
# ------------------------------------------------------------------------------------------------


def _convert_lpips(files: Mapping[str, str], out: str) -> None:
  from softvq_jax.convert import lpips_weights  # pylint: disable=import-outside-toplevel
  model = lpips_weights.load_lpips(files["vgg16"], files["lpips_vgg_heads"])
  lpips_weights.export_lpips(model, out)


def _convert_dino(files: Mapping[str, str], out: str) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import dino_weights, safetensors_io, timm_vit  # pylint: disable=import-outside-toplevel
  from softvq_jax.models.discriminator import DinoDiscriminator  # pylint: disable=import-outside-toplevel
  src = files["dino_vits16"]
  state_dict = timm_vit.read_state_dict(src)
  # The reference's backbone: ViT-S/16 at 224 px; a strict load refuses any other checkpoint.
  disc = nnx.eval_shape(lambda: DinoDiscriminator(rngs=nnx.Rngs(0)))
  dino_weights.load_dino_backbone(disc, state_dict, source=src)
  safetensors_io.write_safetensors(
      out, {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()},
      metadata={"format": "pt", "source": os.path.basename(src)})


def _convert_repa(files: Mapping[str, str], out: str) -> None:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from softvq_jax.convert import timm_vit  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import repa  # pylint: disable=import-outside-toplevel
  src = files["dinov2_vitl14"]
  # Already timm's safetensors: checked by a strict load at its native grid (518 px, patch 14).
  teacher = nnx.eval_shape(lambda: repa.build_repa_teacher("L", 518, 14, rngs=nnx.Rngs(0)))
  timm_vit.load_timm_vit(teacher, timm_vit.read_state_dict(src), source=src)
  shutil.copyfile(src, out)


def _convert_inception(files: Mapping[str, str], out: str) -> None:
  from softvq_jax.convert import inception_weights  # pylint: disable=import-outside-toplevel
  model = inception_weights.load_inception(files["fid_inception"])
  inception_weights.export_inception(model, out)


_CONVERTERS = {"lpips": _convert_lpips, "dino": _convert_dino, "repa_teacher": _convert_repa,
               "inception": _convert_inception}


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


@contextlib.contextmanager
def _lock(path: str):
  """An exclusive lock between processes on this host (fcntl; a no-op where there is none)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # not POSIX
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _place(tmp: str, dest: str) -> None:
  """Atomically puts the finished file `tmp` at `dest` (local rename, or upload + rename)."""
  if not is_remote(dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.replace(tmp, dest)
    return
  from etils import epath  # pylint: disable=import-outside-toplevel
  staging = epath.Path(f"{dest}.tmp-{socket.gethostname()}-{os.getpid()}")
  staging.parent.mkdir(parents=True, exist_ok=True)
  with open(tmp, "rb") as src, staging.open("wb") as dst:
    shutil.copyfileobj(src, dst, _CHUNK)
  staging.rename(dest)  # an object store makes the final name appear only when complete
  os.remove(tmp)


def fetch_one(name: str, cache_dir: str = "", *, sources=None, timeout: float = 30.0,
              report: Callable[[str], None] = lambda msg: None, keep_downloads: bool = False) -> str:
  """Makes sure the cache holds `name`'s converted file; returns its local path."""
  if name not in NETWORKS:
    raise FetchError(f"unknown network {name!r}; one of {sorted(NETWORKS)}")
  net, table = NETWORKS[name], load_sources(sources)
  cache_dir = resolve_cache_dir(cache_dir)
  dl_dir = downloads_dir(cache_dir)
  have = cached(name, cache_dir)
  if have:
    return have
  if net.needs_torch and not torch_available():
    raise FetchError(f"converting {name} ({', '.join(table[k].filename for k in net.downloads)}) "
                     "reads PyTorch files, which needs torch: pip install -e .[convert]")
  with _lock(os.path.join(dl_dir, f"{name}.lock")):
    have = cached(name, cache_dir)  # another process may have finished it while we waited
    if have:
      return have
    files, digests = {}, {}
    for key in net.downloads:
      d = table[key]
      report(f"{name}: {d.url} ({_mib(d.size)})")
      files[key], digests[key] = download(d, dl_dir, timeout=timeout, report=report)
    report(f"{name}: converting to {net.file}")
    fd, tmp = tempfile.mkstemp(prefix=f".{net.file}.", suffix=".tmp", dir=dl_dir)
    os.close(fd)
    try:
      _CONVERTERS[name](files, tmp)
      dest = cache_file(name, cache_dir)
      sidecar = {"network": name, "title": net.title, "file": net.file,
                 "sha256": sha256_of(tmp),
                 "sources": [{"url": table[k].url, "file": table[k].filename,
                              "size": os.path.getsize(files[k]), "sha256": digests[k]}
                             for k in net.downloads],
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
      _write_sidecar(dest + ".json", sidecar)
      _place(tmp, dest)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    if not keep_downloads:
      for key in net.downloads:
        for path in (files[key], files[key] + ".sha256"):
          if os.path.exists(path):
            os.remove(path)
  report(f"{name}: cached {dest} (sources: " +
         ", ".join(f"{table[k].filename} sha256 {digests[k]}" for k in net.downloads) + ")")
  return cached(name, cache_dir)


def _write_sidecar(path: str, content: dict) -> None:
  text = json.dumps(content, indent=2)
  if is_remote(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    epath.Path(path).write_text(text)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def fetch(names: Iterable[str], cache_dir: str = "", *, sources=None, timeout: float = 30.0,
          report: Callable[[str], None] = lambda msg: None) -> dict[str, str]:
  """fetch_one for each name; all failures are reported together in one FetchError.

  After the first OfflineError the remaining networks are not attempted (they would only time
  out the same way); the message then lists every missing file and where to put it.
  """
  names = list(dict.fromkeys(names))
  done, errors, offline = {}, [], None
  for name in names:
    if offline is not None:
      continue
    try:
      done[name] = fetch_one(name, cache_dir, sources=sources, timeout=timeout, report=report)
    except OfflineError as e:
      offline = e
    except FetchError as e:
      errors.append(f"{name}: {e}")
  missing = [n for n in names if n not in done]
  if offline is not None:
    raise OfflineError(f"cannot download the frozen networks' weights: {offline}.\n" +
                       ("\n".join(errors) + "\n" if errors else "") +
                       manual_instructions(missing, cache_dir, sources))
  if errors:
    raise FetchError("\n".join(errors))
  return done


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m softvq_jax.pretrained",
      description="Download, verify (size, SHA-256), convert and cache the frozen networks of the "
                  "training objective and the evaluation: " +
                  ", ".join(f"{n} = {net.title}" for n, net in NETWORKS.items()) + ".")
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fetch", help="fetch networks into the cache (skips cached ones)")
  f.add_argument("--cache_dir", default="",
                 help="cache directory or gs:// URL (default: $XDG_CACHE_HOME/softvq_jax or "
                      "~/.cache/softvq_jax); the runs' config.pretrained.cache_dir")
  f.add_argument("--only", default="",
                 help="comma-separated subset of " + ",".join(NETWORKS) + " (default: all)")
  f.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(NETWORKS)
  unknown = [n for n in names if n not in NETWORKS]
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from {','.join(NETWORKS)}")
  say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  try:
    paths = fetch(names, args.cache_dir, timeout=args.timeout, report=say)
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for name, path in paths.items():
    print(f"{name}: {path}")
  return 0
