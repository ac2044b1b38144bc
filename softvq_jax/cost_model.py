"""The analytic cost model of the train step: per-device memory and FLOPs from shapes alone.

Per-device state bytes are exact (`sharding.per_device_bytes` of the trainer's abstract, sharded
state and frozen networks); activations and FLOPs come from the ViT / VGG shapes (formulas in
`analytic_per_image`, `objective_per_image` and `analytic_estimate`). softvq_jax/compile_plan.py
reports them beside the compiled numbers (and falls back to them when nothing can be compiled);
benchmarks/memory_table.py makes docs/memory_planning.md's table from them. Checked against
compiled numbers in tests/test_compile.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from softvq_jax import sharding
from softvq_jax.hardware import Target
from softvq_jax.models.vit import VIT_SIZES



def _vit_dims(size: str):
  return VIT_SIZES[size]


def _attention_backend(cfg, platform: str) -> str:
  if cfg.attention_backend != "auto":
    return cfg.attention_backend
  return "cudnn" if platform == "gpu" and cfg.compute_dtype in ("bfloat16", "float16") else "xla"


def _dtype_bytes(compute_dtype: str) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[compute_dtype]


def _vit_cost(width: int, depth: int, heads: int, tokens: int, s: int, attn: str, *,
              remat: bool = False) -> tuple[float, float, float]:
  """(activation bytes saved for the backward, forward FLOPs, one block's activation bytes) of
  `depth` pre-norm blocks on `tokens` tokens, per image (see `analytic_per_image`)."""
  d, t, h = width, tokens, heads
  att_bytes = s * t * d + 4 * h * t if attn == "cudnn" else (4 + s) * h * t * t
  block = 18 * s * t * d + att_bytes
  act = (depth * s * t * d + block) if remat else depth * block
  flops = depth * (24 * t * d * d + 4 * t * t * d)
  return float(act), float(flops), float(block)


def analytic_per_image(cfg, platform: str) -> dict[str, float]:
  """The tokenizer's activation bytes saved for the backward pass and training FLOPs, per image.

  Per transformer block of T tokens, width D, H heads, MLP 4D, compute dtype of s bytes, without
  rematerialisation, the backward pass needs (Korthikanti et al. 2022's count for this block):
    s*T*D * 18     norm1 in, qkv in, q/k/v (3), attention out, proj out, residual, norm2 in/out
                   (counted as 2), fc1 out (4), GELU out (4), fc2 out
  + (4 + s)*H*T^2  float32 softmax output + its compute-dtype copy for the P.V matmul
                   (einsum attention; fused flash attention (cuDNN) saves only s*T*D + 4*H*T).
  With `remat` only each block's input (s*T*D) is kept, plus one block's full set while it is
  recomputed. Encoder T = 1 + P + N (cls, P patches, N latent tokens), decoder T = [1] + P + N.
  One more block's worth is live as cotangents while a block runs backward (the peak is at the
  decoder's top block). The soft quantizer keeps ~6 float32 [N, K] arrays (logits, probs,
  entropy softmax / log-softmax, one-hot histogram); pixels add the float32 image,
  reconstruction and patch tensors.

  FLOPs (multiply-add = 2): per block 24*T*D^2 (qkv 6, proj 2, MLP 16) + 4*T^2*D (QK^T, PV);
  plus the patch embedding, pixel head, token projections and the two [N, K, e] quantizer
  matmuls; training = 3x the forward (the backward costs twice the forward).

  The objective's other networks (LPIPS, discriminator, REPA teacher) are `objective_per_image`.
  """
  s = _dtype_bytes(cfg.compute_dtype)
  p, n = cfg.patch_size, cfg.num_latent_tokens
  patches = cfg.grid ** 2
  attn = _attention_backend(cfg, platform)

  def vit(size, prefix):
    d, depth, h = _vit_dims(size)
    t = prefix + patches + n
    act, flops, block = _vit_cost(d, depth, h, t, s, attn, remat=cfg.remat)
    act += 2 * s * t * d  # final norm in/out
    return act, flops, d, block

  enc_act, enc_flops, de, enc_block = vit(cfg.encoder_size, 1)
  dec_act, dec_flops, dd, dec_block = vit(cfg.decoder_size, 1 if cfg.dec_cls_token else 0)
  # The backward pass of a block needs cotangents the size of that block's activations, live
  # next to everything saved: the peak is reached at the decoder's top block.
  working = max(enc_block, dec_block)
  k, e = cfg.codebook_size, cfg.codebook_embed_dim
  quant_act = 6 * 4 * n * k
  pixels = cfg.image_size ** 2 * 3
  pixel_act = 4 * pixels * 3 + s * pixels * 2
  fwd = (enc_flops + dec_flops + 2 * patches * (3 * p * p) * (de + dd)
         + 2 * n * e * (de + dd) + 2 * 2 * n * k * e)
  return {"activation_bytes": float(enc_act + dec_act + working + quant_act + pixel_act),
          "working_bytes": float(working), "train_flops": float(3 * fwd), "attention": attn}


def _vgg16_cost(size: int) -> tuple[float, float, float]:
  """(sum of the 13 conv outputs' elements, sum of the 5 read-outs' elements, forward FLOPs) of
  LPIPS-VGG16 on one size x size image (3x3 convs, padding 1, 2x2 pools before stages 2-5).

  FLOPs count the taps that fall inside the image, (3h - 2)^2 of the 9h^2 per output plane, as
  XLA's cost analysis does (the zero padding is not work)."""
  from softvq_jax.models.lpips import VGG16_STAGES  # pylint: disable=import-outside-toplevel
  h, cin = size, 3
  conv_elems = readout_elems = flops = 0
  for k, stage in enumerate(VGG16_STAGES):
    if k:
      h //= 2
    for cout in stage:
      conv_elems += h * h * cout
      flops += 2 * (3 * h - 2) ** 2 * cin * cout
      cin = cout
    readout_elems += h * h * cin
  return float(conv_elems), float(readout_elems), float(flops)


def objective_per_image(config, platform: str) -> dict[str, dict[str, float]]:
  """Activation bytes and training FLOPs per image of the objective's other networks, by part.

  Only terms whose weight is > 0 appear (`objective.build_objective` builds nothing else).
  s = compute-dtype bytes; einsum/cuDNN attention as for the tokenizer (`analytic_per_image`,
  whose block formula `_vit_cost` is reused for the ViTs here). Their frozen weights are state
  (exact, `state_bytes["frozen"]`), not counted here.

  lpips (x and x_hat through VGG16 at the image size S; gradient to x_hat only):
    bytes  = 2*s*E + 8*R, E = sum of the 13 conv outputs' elements (a ReLU mask and the pooled
             input per layer), R = sum of the 5 read-outs (x_hat's float32 feature and the float32
             difference of the unit-normalised features, both needed by the backward). x's VGG
             pass is forward-only: only its read-outs live until the difference is taken.
    flops  = 3 * F_vgg (x forward, x_hat forward, x_hat input-gradient: no weight gradients),
             F_vgg = sum over the convs of 2*(3h-2)^2*C_in*C_out (taps inside the h x h image).
  disc (DINO ViT-S/16 at disc.img_size, T = 1 + P tokens, the blocks up to the last read-out;
        5 heads Block(k=1) -> Block(k=9) -> conv(D->1) on [P, D]):
    generator step, 1 call, gradient to the image through the frozen backbone:
      bytes_g = backbone blocks (`_vit_cost`) + n_heads * c_h * P*D + 4 float32 image copies
                (DiffAugment and the resize to the backbone's size);
      flops_g = 2 * (F_backbone + F_heads)   (forward + input gradient);
    discriminator step, n = 2 calls (real, detached x_hat) + 2 with consistency regularisation,
    backbone forward only (its input carries no gradient), gradient to the heads:
      bytes_d = n * n_heads * c_h * P*D;
      flops_d = n * (F_backbone + 3 * F_heads);
    c_h = 6*s + 8: per head, the conv inputs/outputs and LeakyReLU masks in the compute dtype and
    the two BatchNorms' float32 normalised activations. F_heads = n_heads * 2*P*(D^2 + k*D^2 + D).
  repa (DINOv2 teacher at the image size, patch repa.patch_size, forward only: its activations
        die block by block; the REPA projector e -> h -> h -> D_t on the N latent tokens):
    bytes  = 4*P_t*D_t (the teacher's float32 tokens, kept for the loss) + the projector's
             s*N*(2h + D_t) + float32 4*N*D_t;
    flops  = F_teacher + 3 * F_projector.
  With `loss.adaptive_weight` two more forwards of the generator objective and the backward
  through LPIPS / the discriminator to x_hat are added (FLOPs only: they run one after another).

  The generator step's parts are live together at its peak; the discriminator step runs after
  it (on the reconstruction and the new state), so the estimate takes the larger of the two.
  `working` is one block of the largest ViT that runs forward only there (a transient).
  """
  lc = config.loss
  s = _dtype_bytes(config.model.compute_dtype)
  attn = _attention_backend(config.model, platform)
  size = config.image_size
  gen, disc_step, flops, working = {}, {}, {}, 0.0
  if lc.perceptual_weight > 0:
    e, r, f = _vgg16_cost(size)
    gen["lpips"] = 2 * s * e + 8 * r
    flops["lpips"] = 3 * f
  if lc.gan_weight > 0:
    d = config.disc
    width, depth, heads = _vit_dims(d.backbone_size)
    used = max(int(i) for i in d.readout_blocks) + 1
    patches = (d.img_size // d.patch_size) ** 2
    t = 1 + patches
    bb_act, bb_flops, bb_block = _vit_cost(width, used, heads, t, s, attn)
    bb_flops += 2 * patches * 3 * d.patch_size ** 2 * width
    n_heads = 1 + len(d.readout_blocks)
    head_act = n_heads * (6 * s + 8) * patches * width
    head_flops = n_heads * 2 * patches * (width ** 2 * (1 + d.head_kernel_size) + width)
    calls = 2 + (2 if lc.cr_weight > 0 else 0)
    gen["disc"] = bb_act + head_act + 4 * 4 * 3 * (size ** 2 + d.img_size ** 2)
    disc_step["disc"] = calls * head_act
    flops["disc_generator_step"] = 2 * (bb_flops + head_flops)
    flops["disc_discriminator_step"] = calls * (bb_flops + 3 * head_flops)
    working = max(working, bb_block)
  if lc.repa_weight > 0:
    r = config.repa
    tw, tdepth, th = _vit_dims(r.teacher_size)
    tdepth = int(r.teacher_depth) or tdepth
    tp = (size // r.patch_size) ** 2
    _, t_flops, t_block = _vit_cost(tw, tdepth, th, 1 + tp, s, attn)
    t_flops += 2 * tp * 3 * r.patch_size ** 2 * tw
    n, e, h = config.model.num_latent_tokens, config.model.codebook_embed_dim, r.hidden_dim
    gen["repa"] = 4 * tp * tw + s * n * (2 * h + tw) + 4 * n * tw
    flops["repa"] = t_flops + 3 * 2 * n * (e * h + h * h + h * tw)
    working = max(working, t_block)
  if lc.adaptive_weight and lc.gan_weight > 0:
    # pylint: disable-next=import-outside-toplevel
    from softvq_jax.models.tokenizer import TokenizerConfig
    tok_fwd = analytic_per_image(TokenizerConfig.from_config(config), platform)["train_flops"] / 3
    extra = 2 * tok_fwd + flops["disc_generator_step"]
    if "lpips" in flops:  # (REPA is not part of either gradient: XLA drops it there)
      extra += flops["lpips"]
    flops["adaptive_weight"] = extra
  return {"generator_step_bytes": gen, "discriminator_step_bytes": disc_step,
          "train_flops": flops, "working_bytes": working}


def state_bytes(trainer) -> dict[str, int]:
  """Per-device bytes of each part of the TrainState (params, ema_params, opt_state, ...) and of
  the frozen networks the step takes beside it ("frozen")."""
  parts = {f.name: (getattr(trainer.abstract_state, f.name), getattr(trainer.state_sharding, f.name))
           for f in dataclasses.fields(trainer.abstract_state)}
  parts["frozen"] = (trainer.abstract_frozen, trainer.frozen_sharding)
  out = {}
  for name, (a, s) in parts.items():
    if a is None or not _leaves(a):
      continue
    out[name] = int(sharding.per_device_bytes(a, s))
  out["total"] = sum(out.values())
  return out


def _leaves(tree):
  return jax.tree.leaves(tree)


def analytic_estimate(config, target: Target, trainer) -> dict[str, Any]:
  """Per-device memory and per-step FLOPs without compiling (see `analytic_per_image` and
  `objective_per_image`).

  total = state (exact, from the sharding plan: parameters, EMA, both optimizers' moments, the
  discriminator's statistics and the frozen networks) + batch + gradients (float32, sharded like
  the parameters: tokenizer + REPA projector + discriminator heads) + with
  `frozen_sharding="fsdp"` the all-gathered frozen weights + per-device micro-batch x
  activations per image, where activations per image = max(generator step, discriminator step):
    generator step     = tokenizer + LPIPS + discriminator (1 call, backward to the image) +
                         REPA (+ a forward-only block larger than the tokenizer's, if any);
    discriminator step = 2 (+2 with consistency regularisation) calls' head activations.
  Checked against compiled numbers in tests/test_compile.py and docs/memory_planning.md.
  """
  from softvq_jax.models.tokenizer import TokenizerConfig  # pylint: disable=import-outside-toplevel
  cfg = TokenizerConfig.from_config(config)
  state = state_bytes(trainer)
  per_dev_batch = per_device_batch(config, trainer.mesh)
  micro = max(per_dev_batch // max(int(config.grad_accum_steps), 1), 1)
  img = analytic_per_image(cfg, target.platform)
  obj = objective_per_image(config, target.platform)
  batch = batch_bytes(config, per_dev_batch)
  grads = sum(state.get(k, 0) for k in ("params", "proj_params", "disc_params"))
  by_part = {"tokenizer": img["activation_bytes"], **obj["generator_step_bytes"]}
  generator = sum(by_part.values()) + max(obj["working_bytes"] - img["working_bytes"], 0.0)
  discriminator = sum(obj["discriminator_step_bytes"].values())
  if discriminator:
    by_part["disc_discriminator_step"] = discriminator
  per_image = max(generator, discriminator)
  activations = micro * per_image
  # FSDP-split frozen networks are all-gathered for use; XLA may hold every gathered copy at
  # once (measured on XLA:CPU), so count the full weights less the shard already in the state.
  gathered = 0
  if state.get("frozen") and config.frozen_sharding == "fsdp":
    gathered = sum(int(math.prod(x.shape)) * x.dtype.itemsize
                   for x in _leaves(trainer.abstract_frozen)) - state["frozen"]
  total = state["total"] + batch + grads + activations + gathered
  flops_by_part = {"tokenizer": img["train_flops"], **obj["train_flops"]}
  flops = sum(flops_by_part.values())
  return {
      "state_bytes": state,
      "batch_bytes": batch,
      "gradient_bytes": grads,
      "gathered_frozen_bytes": gathered,
      "activation_bytes": activations,
      "activation_bytes_per_image": per_image,
      "activation_bytes_by_part": by_part,
      "attention": img["attention"],
      "total_bytes": total,
      "train_flops_per_image": flops,
      "train_flops_by_part": flops_by_part,
      "train_flops_per_step": flops * int(config.batch_size),
  }


def batch_bytes(config, per_dev_batch: int) -> int:
  itemsize = 1 if config.data.output_dtype == "uint8" else 4
  return per_dev_batch * config.image_size ** 2 * 3 * itemsize


def per_device_batch(config, mesh) -> int:
  """Images each device processes per step; the global batch must split evenly."""
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size={config.batch_size} does not split over the "
                     f"{shards} data x fsdp shards of mesh {dict(mesh.shape)}: use a multiple of "
                     f"{shards}")
  return config.batch_size // shards


def max_batch_per_device(report: dict) -> int:
  """Largest per-device batch whose analytic total fits the target (state and gradients are
  batch-independent, activations linear in the batch)."""
  a, t = report["analytic"], report["target"]
  fixed = a["state_bytes"]["total"] + a["gradient_bytes"] + a.get("gathered_frozen_bytes", 0)
  per_image = (a["activation_bytes_per_image"]
               + a["batch_bytes"] / max(report["per_device_batch"], 1))
  return max(int((t["usable_bytes"] - fixed) // per_image), 0)
