"""softvq_jax/fetch.py without the internet: a loopback HTTP server serves weight files made here
(random weights of the right shapes), including a corrupt file, a connection that drops mid-file
and a server that cannot be reached. The fetched file must be verified, converted, cached under
its final name only when complete, and found by the loaders when config.pretrained is empty."""
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest

from conftest import require
from softvq_jax import fetch, preflight, pretrained

ROOT = os.path.join(os.path.dirname(__file__), "..")


class _State:
  """What the server serves and what it saw."""

  def __init__(self):
    self.files = {}          # path -> bytes
    self.redirects = {}      # path -> (target path, extra headers)
    self.drop_once = set()   # paths whose next response stops after half the body
    self.no_range = set()    # paths for which Range is ignored (answered 200 in full)
    self.bad_range = set()   # paths answered 206 from byte 0 whatever range was asked
    self.requests = []       # (path, Range header)


class _Handler(http.server.BaseHTTPRequestHandler):
  timeout = 10  # a stuck client cannot hold a server thread forever

  def do_GET(self):  # noqa: N802
    st = self.server.state
    rng = self.headers.get("Range")
    st.requests.append((self.path, rng))
    if self.path in st.redirects:
      target, extra = st.redirects[self.path]
      self.send_response(302)
      self.send_header("Location", target)
      for k, v in extra.items():
        self.send_header(k, v)
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    data = st.files.get(self.path)
    if data is None:
      self.send_error(404)
      return
    start = 0
    if rng and self.path not in st.no_range:
      start = 0 if self.path in st.bad_range else int(rng.split("=", 1)[1].split("-", 1)[0])
      if start >= len(data):
        self.send_response(416)
        self.send_header("Content-Range", f"bytes */{len(data)}")
        self.end_headers()
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.path in st.drop_once:
      st.drop_once.discard(self.path)
      self.wfile.write(body[:len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def server():
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.daemon_threads = True
  srv.state = _State()
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
  try:
    yield srv
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _torch_bytes(state_dict) -> bytes:
  torch = require("torch")
  buf = io.BytesIO()
  torch.save(state_dict, buf)
  return buf.getvalue()


@pytest.fixture(scope="module")
def lpips_sources():
  """Random VGG16 `features.*` (the classifier LPIPS ignores is left out: 59 MB instead of 528) and
  random v0.1 heads, as the .pth files torchvision and lpips publish."""
  torch = require("torch")
  torchvision = require("torchvision")
  torch.manual_seed(0)
  features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
  vgg = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
  heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
           for k, c in enumerate((64, 128, 256, 512, 512))}
  return _torch_bytes(vgg), _torch_bytes(heads), vgg


def _serve_lpips(server, lpips_sources, tmp_path):
  vgg_bytes, heads_bytes, _ = lpips_sources
  server.state.files.update({"/vgg16.pth": vgg_bytes, "/vgg.pth": heads_bytes})
  table = {"vgg16": {"url": server.url + "/vgg16.pth", "size": len(vgg_bytes),
                     "sha256": _sha(vgg_bytes)},
           "lpips_vgg_heads": {"url": server.url + "/vgg.pth", "size": len(heads_bytes),
                               "sha256": _sha(heads_bytes)}}
  path = tmp_path / "sources.json"
  path.write_text(json.dumps(table))
  return str(path)


def _pretrained_config(cache_dir, **kw):
  pc = ml_collections.ConfigDict(dict(inception="", lpips="", dino="", repa_teacher="",
                                      cache_dir=str(cache_dir), auto_fetch=True,
                                      allow_random_init=False))
  pc.update(kw)
  return pc


def test_cli_fetch_resumes_a_broken_download_verifies_converts_and_caches(server, lpips_sources,
                                                                        tmp_path):
  """`python -m softvq_jax.pretrained fetch --only=lpips`: the VGG16 download breaks half-way and
  is resumed with a Range request; the result is converted once and the loader finds it."""
  sources = _serve_lpips(server, lpips_sources, tmp_path)
  server.state.drop_once.add("/vgg16.pth")
  cache = tmp_path / "cache"
  env = dict(os.environ, **{fetch.SOURCES_ENV: sources})
  proc = subprocess.run([sys.executable, "-m", "softvq_jax.pretrained", "fetch", "--only=lpips",
                         f"--cache_dir={cache}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  vgg_requests = [r for p, r in server.state.requests if p == "/vgg16.pth"]
  assert vgg_requests[0] is None and vgg_requests[1].startswith("bytes="), vgg_requests
  assert int(vgg_requests[1].split("=")[1].rstrip("-")) > 0, "the second request did not resume"
  cached = cache / fetch.NETWORKS["lpips"].file
  assert proc.stdout.strip() == f"lpips: {cached}"
  # Only complete, final files in the cache; the raw downloads are gone after the conversion.
  assert sorted(p.name for p in cache.iterdir()) == ["downloads", cached.name,
                                                       cached.name + ".json"]
  assert not [p for p in (cache / "downloads").iterdir() if not p.name.endswith(".lock")]
  side = json.loads((cache / (cached.name + ".json")).read_text())
  assert [s["sha256"] for s in side["sources"]] == [_sha(lpips_sources[0]), _sha(lpips_sources[1])]
  assert side["sha256"] == fetch.sha256_of(str(cached))
  # The objective / evaluation loader finds it with config.pretrained.lpips empty.
  model, is_random = pretrained.load_lpips(_pretrained_config(cache))
  assert not is_random
  torch_kernel = lpips_sources[2]["features.0.weight"].numpy()  # [out, in, kh, kw]
  np.testing.assert_array_equal(np.asarray(model.convs[0].kernel[...]),
                                torch_kernel.transpose(2, 3, 1, 0))
  # ... and so does the pre-flight: nothing is missing any more.
  problems, fetchable = preflight.check_pretrained(
      ml_collections.ConfigDict(dict(pretrained=_pretrained_config(cache, auto_fetch=False),
                                     loss=dict(perceptual_weight=1.0, gan_weight=0.0,
                                               repa_weight=0.0), eval=dict(every_steps=0))),
      "train")
  assert problems == [] and fetchable == []
  # A second fetch does nothing (no new requests).
  n = len(server.state.requests)
  assert fetch.fetch(["lpips"], str(cache), sources=sources) == {"lpips": str(cached)}
  assert len(server.state.requests) == n


def test_preflight_auto_fetches_what_the_run_needs(server, lpips_sources, tmp_path, monkeypatch):
  """main's first run with config.pretrained.auto_fetch: the pre-flight fetches the missing
  networks (here LPIPS only: the GAN and REPA weights are 0) before anything else happens."""
  monkeypatch.setenv(fetch.SOURCES_ENV, _serve_lpips(server, lpips_sources, tmp_path))
  config = ml_collections.ConfigDict(dict(
      pretrained=_pretrained_config(tmp_path / "cache"),
      loss=dict(perceptual_weight=1.0, gan_weight=0.0, repa_weight=0.0),
      eval=dict(every_steps=0)))
  _, fetchable = preflight.check_pretrained(config, "train")
  assert fetchable == ["lpips"]
  messages = []
  fetch.fetch(fetchable, str(tmp_path / "cache"), report=messages.append)
  assert (tmp_path / "cache" / fetch.NETWORKS["lpips"].file).is_file()
  assert any("converting" in m for m in messages)


def test_corrupt_download_is_refused_and_nothing_is_cached(server, tmp_path):
  good, bad = b"weights!" * 4096, b"weightz!" * 4096
  server.state.files["/vgg16.pth"] = bad
  sources = {"vgg16": {"url": server.url + "/vgg16.pth", "size": len(good), "sha256": _sha(good)}}
  cache = tmp_path / "cache"
  with pytest.raises(fetch.ChecksumError) as e:
    fetch.fetch_one("lpips", str(cache), sources=sources)
  msg = str(e.value)
  assert _sha(good) in msg and _sha(bad) in msg and "nothing was cached" in msg
  assert not (cache / fetch.NETWORKS["lpips"].file).exists()
  leftovers = [p.name for p in (cache / "downloads").iterdir() if not p.name.endswith(".lock")]
  assert leftovers == [], leftovers
  # A wrong size is refused the same way.
  server.state.files["/vgg16.pth"] = good[:-1]
  with pytest.raises(fetch.ChecksumError, match=f"expected {len(good)}"):
    fetch.fetch_one("lpips", str(cache), sources=sources)
  assert not (cache / fetch.NETWORKS["lpips"].file).exists()


@pytest.mark.parametrize("behaviour", ["resumes", "ignores_range", "wrong_range"])
def test_broken_connection_is_resumed_or_restarted(server, tmp_path, behaviour):
  """The connection drops half-way: resumed with a Range request (206), restarted when the server
  answers 200 in full or a 206 from another byte; never a partial file under the final name."""
  data = np.random.default_rng(0).bytes(3 * 2**20 + 17)
  server.state.files["/f.bin"] = data
  server.state.drop_once.add("/f.bin")
  if behaviour == "ignores_range":
    server.state.no_range.add("/f.bin")
  if behaviour == "wrong_range":
    server.state.bad_range.add("/f.bin")
  d = fetch.Download(url=server.url + "/f.bin", filename="f.bin", size=len(data),
                     sha256=_sha(data))
  path, digest = fetch.download(d, str(tmp_path))
  assert digest == _sha(data) and open(path, "rb").read() == data
  ranges = [r for p, r in server.state.requests if p == "/f.bin"]
  assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
  assert len(ranges) == (3 if behaviour == "wrong_range" else 2), ranges
  assert sorted(os.listdir(tmp_path)) == ["f.bin", "f.bin.sha256"]


def test_hub_published_sha256_is_checked(server, tmp_path):
  """Hugging Face publishes a file's SHA-256 on the redirect (X-Linked-Etag); it is enforced."""
  data = b"safetensors bytes" * 1000
  server.state.files["/cdn/model.safetensors"] = data
  for name, digest in (("good", _sha(data)), ("bad", _sha(b"other"))):
    server.state.redirects[f"/{name}/resolve/main/model.safetensors"] = (
        "/cdn/model.safetensors", {"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))})
  good = fetch.Download(url=server.url + "/good/resolve/main/model.safetensors",
                        filename="good.safetensors", hub_sha256=True)
  assert fetch.download(good, str(tmp_path))[1] == _sha(data)
  bad = fetch.Download(url=server.url + "/bad/resolve/main/model.safetensors",
                       filename="bad.safetensors", hub_sha256=True)
  with pytest.raises(fetch.ChecksumError, match=_sha(b"other")):
    fetch.download(bad, str(tmp_path))
  assert not (tmp_path / "bad.safetensors").exists()
  # Without a published digest the hub file is refused rather than trusted.
  server.state.redirects["/none/resolve/main/model.safetensors"] = ("/cdn/model.safetensors", {})
  none = fetch.Download(url=server.url + "/none/resolve/main/model.safetensors",
                        filename="none.safetensors", hub_sha256=True)
  with pytest.raises(fetch.FetchError, match="published no SHA-256"):
    fetch.download(none, str(tmp_path))


def test_offline_lists_the_files_and_where_to_put_them(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  sources = {k: {"url": f"http://127.0.0.1:{port}/{d.filename}"}
             for k, d in fetch.DOWNLOADS.items()}
  cache = tmp_path / "cache"
  with pytest.raises(fetch.OfflineError) as e:
    fetch.fetch(["lpips", "dino", "repa_teacher", "inception"], str(cache), sources=sources)
  msg = str(e.value)
  downloads = os.path.join(str(cache), "downloads")
  for key, d in fetch.DOWNLOADS.items():
    assert os.path.join(downloads, d.filename) in msg, key
  assert "python -m softvq_jax.pretrained fetch --only=lpips,dino,repa_teacher,inception" in msg
  assert not [p for p in (cache / "downloads").iterdir() if not p.name.endswith(".lock")]


def test_files_put_in_place_by_hand_are_verified_and_converted_offline(server, lpips_sources,
                                                                      tmp_path):
  """The offline route the message describes: the raw files copied into downloads/ are checked
  against the table and converted without any request."""
  sources = json.loads(open(_serve_lpips(server, lpips_sources, tmp_path)).read())
  cache = tmp_path / "cache"
  (cache / "downloads").mkdir(parents=True)
  (cache / "downloads" / "vgg16-397923af.pth").write_bytes(lpips_sources[0])
  (cache / "downloads" / "lpips_v0.1_vgg.pth").write_bytes(b"not the heads")
  with pytest.raises(fetch.ChecksumError, match="lpips_v0.1_vgg.pth is not the expected file"):
    fetch.fetch_one("lpips", str(cache), sources=sources)
  (cache / "downloads" / "lpips_v0.1_vgg.pth").write_bytes(lpips_sources[1])
  fetch.fetch_one("lpips", str(cache), sources=sources)
  assert (cache / fetch.NETWORKS["lpips"].file).is_file()
  assert server.state.requests == []


def test_missing_torch_names_the_convert_extra(tmp_path, monkeypatch):
  import importlib.util  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "torch" else real(name, *a))
  with pytest.raises(fetch.FetchError, match=r"pip install -e \.\[convert\]"):
    fetch.fetch_one("dino", str(tmp_path))
  assert not (tmp_path / "downloads").exists() or not [
      p for p in (tmp_path / "downloads").iterdir() if not p.name.endswith(".lock")]


def test_dino_conversion_checks_the_architecture_and_loads_from_the_cache(tmp_path):
  """dino_deitsmall16_pretrain.pth (random ViT-S/16 weights with timm's names, no head) ->
  the cached .safetensors -> the discriminator backbone; another architecture is refused."""
  timm = require("timm")
  torch = require("torch")
  torch.manual_seed(0)
  vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
  src = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save(vit.state_dict(), src)
  cache = tmp_path / "cache"
  cache.mkdir()
  out = cache / fetch.NETWORKS["dino"].file
  fetch._convert_dino({"dino_vits16": str(src)}, str(out))  # pylint: disable=protected-access
  kwargs = dict(img_size=224, patch_size=16, width=384, depth=12, num_heads=6,
                readout_blocks=(2, 5, 8, 11), head_kernel_size=9)
  disc, is_random = pretrained.load_dino_discriminator(_pretrained_config(cache), kwargs)
  assert not is_random
  np.testing.assert_array_equal(np.asarray(disc.backbone.blocks[3].mlp.fc1.kernel[...]),
                                vit.state_dict()["blocks.3.mlp.fc1.weight"].numpy().T)
  tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
  torch.save(tiny.state_dict(), src)
  with pytest.raises(Exception, match="does not match|shape"):
    fetch._convert_dino({"dino_vits16": str(src)}, str(tmp_path / "x.safetensors"))  # pylint: disable=protected-access
  assert not (tmp_path / "x.safetensors").exists()


def test_cache_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert fetch.resolve_cache_dir("") == str(tmp_path / "xdg" / "softvq_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert fetch.resolve_cache_dir("") == os.path.expanduser("~/.cache/softvq_jax")
  assert fetch.resolve_cache_dir("gs://b/c") == "gs://b/c"
  assert fetch.cache_file("inception", "gs://b/c") == "gs://b/c/fid_inception.safetensors"
  assert fetch.downloads_dir("gs://b/c") == os.path.expanduser("~/.cache/softvq_jax/downloads")
