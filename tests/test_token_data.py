"""Pre-extracted token data (softvq_jax/token_data.py): the Grain source over `--mode=extract`
chunks, its exact-resume pipeline, and the guard against un-normalised latents.

The chunks are written here in the format latents.extract_tokens writes (p<k>/chunk_<i>.npz with
tokens, tokens_flip, label, index + manifest.json); tests/test_latents.py checks that format
against a real extraction, and one test below reads a real extraction through TokenSource.
"""
import json

import numpy as np
import pytest

from softvq_jax import paths, token_data
from softvq_jax import pixels


def _write_extraction(root, n=23, shape=(4, 3), processes=2, per_chunk=5, flip=True,
                      vq=(0.5, 2.0), manifest=True, seed=0):
  """Records 0..n-1 spread over processes (record r on process r % P, as the eval pipeline
  shards), chunks of `per_chunk`; tokens_flip = -tokens - 100 so the two are told apart."""
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(n,) + shape).astype(np.float32)
  labels = rng.integers(0, 1000, n).astype(np.int32)
  for p in range(processes):
    recs = np.arange(p, n, processes)
    (root / f"p{p:03d}").mkdir(parents=True, exist_ok=True)
    for c, start in enumerate(range(0, len(recs), per_chunk)):
      r = recs[start:start + per_chunk]
      arrays = {"tokens": tokens[r], "label": labels[r], "index": r.astype(np.int32)}
      if flip:
        arrays["tokens_flip"] = -tokens[r] - 100
      paths.save_npz(root / f"p{p:03d}" / f"chunk_{c:06d}.npz", **arrays)
  if manifest:
    (root / "manifest.json").write_text(json.dumps({
        "source": "/some/tokenizer", "split": "train", "image_size": 32, "flip": flip,
        "latent_shape": list(shape), "vq_mean": vq[0], "vq_std": vq[1],
        "process_count": processes, "complete": True, "num_examples": n}))
  return tokens, labels


def test_source_serves_normalised_tokens_in_record_order(tmp_path):
  tokens, labels = _write_extraction(tmp_path)
  src = token_data.TokenSource(str(tmp_path), seed=3)
  assert len(src) == 23 and src.latent_shape == (4, 3) and src.flip
  for i in range(23):
    ex = src[i]
    assert ex["index"] == i and ex["label"] == labels[i]
    raw = -tokens[i] - 100 if ex["flipped"] else tokens[i]
    np.testing.assert_allclose(ex["latents"], (raw - 0.5) / 2.0, rtol=1e-6)
    assert ex["latents"].dtype == np.float32
  # The tokenizer's statistics override the manifest's (--mode=stats after the extraction).
  src2 = token_data.TokenSource(str(tmp_path), seed=3, vq_mean=1.0, vq_std=4.0, flip=False)
  np.testing.assert_allclose(src2[5]["latents"], (tokens[5] - 1.0) / 4.0, rtol=1e-6)
  assert not any(src2[i]["flipped"] for i in range(23))


def test_flip_choice_is_a_function_of_seed_epoch_and_record(tmp_path):
  _write_extraction(tmp_path, n=400, shape=(2, 2), per_chunk=50)
  a = token_data.TokenSource(str(tmp_path), seed=1)
  b = token_data.TokenSource(str(tmp_path), seed=1)
  c = token_data.TokenSource(str(tmp_path), seed=2)
  epoch0 = np.array([a.example(i, 0)["flipped"] for i in range(400)])
  np.testing.assert_array_equal(epoch0, [b.example(i, 0)["flipped"] for i in range(400)])
  assert abs(epoch0.mean() - 0.5) < 0.1  # p = 0.5
  epoch1 = np.array([a.example(i, 1)["flipped"] for i in range(400)])
  assert 0.3 < np.mean(epoch0 != epoch1) < 0.7  # re-drawn every epoch
  assert 0.3 < np.mean(epoch0 != [c.example(i, 0)["flipped"] for i in range(400)]) < 0.7
  np.testing.assert_array_equal(epoch1, [a[400 + i]["flipped"] for i in range(400)])


def test_coin_flips_are_fair_and_independent():
  e, r = np.meshgrid(np.arange(50), np.arange(2000), indexing="ij")
  f = token_data.coin_flips(7, e.ravel(), r.ravel()).reshape(50, 2000)
  assert abs(f.mean() - 0.5) < 0.01
  assert abs(np.mean(f[1:] == f[:-1]) - 0.5) < 0.01  # epoch to epoch
  assert abs(np.mean(f[:, 1:] == f[:, :-1]) - 0.5) < 0.01  # record to record
  assert abs(np.mean(f == token_data.coin_flips(8, e.ravel(), r.ravel()).reshape(50, 2000))
             - 0.5) < 0.01  # seed to seed
  assert token_data.coin_flips(7, 3, 11)[0] == f[3, 11]


def test_pipeline_resumes_exactly_and_shards_processes(tmp_path):
  _write_extraction(tmp_path, n=40, shape=(2, 2), per_chunk=7)
  src = token_data.TokenSource(str(tmp_path), seed=5)

  def pipeline(pi=0, pc=1):
    return token_data.build_token_train_pipeline(src, global_batch_size=8, seed=5,
                                                 process_index=pi, process_count=pc)

  it = pipeline()
  full = [next(it) for _ in range(12)]  # 96 examples: more than 2 epochs of 40
  assert full[0]["latents"].shape == (8, 2, 2) and full[0]["label"].dtype == np.int32
  seen = np.concatenate([b["index"] for b in full[:5]])
  assert sorted(seen) == list(range(40))  # epoch 0 = every record once
  for b, batch in enumerate(full):  # the batched gather equals example(record, epoch) row by row
    for r in range(8):
      ex = src.example(int(batch["index"][r]), (8 * b + r) // 40)
      for k in ex:
        np.testing.assert_array_equal(batch[k][r], ex[k], err_msg=k)
  assert 0 < np.mean(np.concatenate([b["flipped"] for b in full])) < 1
  it = pipeline()
  for _ in range(4):
    next(it)
  state = it.get_state()
  resumed = pipeline()
  resumed.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
  for want in full[4:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Two processes: disjoint records, each batch 4.
  p0, p1 = pipeline(0, 2), pipeline(1, 2)
  i0 = np.concatenate([next(p0)["index"] for _ in range(5)])
  i1 = np.concatenate([next(p1)["index"] for _ in range(5)])
  assert set(i0) == set(range(0, 40, 2)) and set(i1) == set(range(1, 40, 2))


def test_guard_refuses_default_statistics(tmp_path):
  with pytest.raises(token_data.UnnormalisedLatentsError,
                     match=r"(?s)classic silent failure.*--mode=stats.*allow_unnormalised_latents"):
    token_data.check_latent_statistics(0.0, 1.0)
  token_data.check_latent_statistics(0.0, 1.0, allow_unnormalised_latents=True)
  token_data.check_latent_statistics(0.0, 0.9)
  token_data.check_latent_statistics(-0.01, 1.0)
  for bad in ((float("nan"), 1.0), (0.1, 0.0), (0.1, -1.0)):
    with pytest.raises(ValueError, match="unusable"):
      token_data.check_latent_statistics(*bad, allow_unnormalised_latents=True)
  _write_extraction(tmp_path, vq=(0.0, 1.0))
  with pytest.raises(token_data.UnnormalisedLatentsError, match="/some/tokenizer"):
    token_data.TokenSource(str(tmp_path))
  src = token_data.TokenSource(str(tmp_path), allow_unnormalised_latents=True)
  assert src.vq_mean == 0.0 and src.vq_std == 1.0
  token_data.TokenSource(str(tmp_path), vq_mean=0.2, vq_std=0.8)  # the tokenizer's own stats


def test_incomplete_or_wrong_extractions_are_refused(tmp_path):
  _write_extraction(tmp_path / "partial", manifest=False)
  with pytest.raises(FileNotFoundError, match="did not finish.*resumes"):
    token_data.TokenSource(str(tmp_path / "partial"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="run --mode=extract"):
    token_data.TokenSource(str(tmp_path / "empty"))
  _write_extraction(tmp_path / "noflip", flip=False)
  with pytest.raises(ValueError, match="latents.flip=True"):
    token_data.TokenSource(str(tmp_path / "noflip"), flip=True)
  assert not token_data.TokenSource(str(tmp_path / "noflip")).flip
  _write_extraction(tmp_path / "short")
  m = json.loads((tmp_path / "short" / "manifest.json").read_text())
  m["num_examples"] = 30
  (tmp_path / "short" / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(ValueError, match="manifest says 30"):
    token_data.TokenSource(str(tmp_path / "short"))


def test_reads_a_real_extraction(tmp_path):
  """latents.extract_tokens (--mode=extract, with flips) of a tiny tokenizer -> TokenSource serves
  (tok.encode(crop) - vq_mean) / vq_std, or the same of the flipped crop."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from softvq_jax import api, data, latents  # pylint: disable=import-outside-toplevel
  from softvq_jax.models import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.data.demo_eval_size = 12
  config.latents.split = "validation"
  config.latents.batch_size = 8
  config.latents.chunk_batches = 1
  config.latents.flip = True
  cfg = tok_lib.TokenizerConfig.from_config(config).replace(vq_mean=0.1, vq_std=0.7,
                                                    attention_backend="xla")
  tok = api.Tokenizer(cfg, tok_lib.build_tokenizer(cfg, seed=0))
  tok.save(str(tmp_path / "tok"))
  out = tmp_path / "tokens"
  latents.extract_tokens(config, str(tmp_path / "work"), checkpoint=str(tmp_path / "tok"),
                         out_dir=str(out))
  src = token_data.TokenSource(str(out), seed=0)
  assert len(src) == 12 and src.flip
  assert (src.vq_mean, src.vq_std) == (0.1, 0.7)  # from the manifest
  it = data.build_eval_pipeline(config.data, image_size=32, global_batch_size=16,
                                split="validation")
  batch = next(iter(it))
  x = pixels.to_model_range(batch["image"][batch["mask"]])
  plain = np.asarray(tok.encode(x, normalize=True))
  flipped = np.asarray(tok.encode(x[:, :, ::-1], normalize=True))
  kinds = set()
  for epoch in range(3):
    for i in range(12):
      ex = src.example(i, epoch)
      kinds.add(bool(ex["flipped"]))
      assert ex["label"] == batch["label"][batch["mask"]][i]
      np.testing.assert_allclose(ex["latents"], flipped[i] if ex["flipped"] else plain[i],
                                 rtol=1e-4, atol=1e-5)
  assert kinds == {True, False}
