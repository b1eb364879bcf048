"""Our denoiser as a diffusers `UNet2DModel`, and our noise schedule as a diffusers scheduler config.

The UNet is the DDPM port's CIFAR-10 network (Ho et al. 2020), the same network diffusers'
`UNet2DModel` expresses (google/ddpm-cifar10-32 loads into it), so the conversion is a renaming
plus three reshapes, and `to_diffusers(net)(x, t, y)` equals `net(x, t, y)` to float round-off:
  time embedding  ours interleaves [sin f0, cos f0, sin f1, …]; diffusers concatenates
                  [cos f0 … cos f_{h−1}, sin f0 … sin f_{h−1}] (flip_sin_to_cos=True, freq_shift=0,
                  the same frequencies 10000^(−i/h)): the input columns of the first time-MLP
                  Linear are permuted to match.
  class label     `label_emb` (num_classes + 1 rows, the last the null label) is added to the time
                  embedding after the MLP: diffusers' `class_embedding` (num_class_embeds =
                  num_classes + 1, class_embed_type None). With cond_drop="batch" our forward
                  multiplies the null row's embedding by 0, so that row is exported as zeros.
  attention       single-head over H·W, 1×1-conv qkv and projection: the conv weights become the
                  to_q/to_k/to_v/to_out Linear weights of diffusers' Attention, one head per block.
Everything else maps one to one: GroupNorm(cfg.norm_groups, eps 1e-5) -> norm_num_groups; a level
in cfg.attn_levels -> AttnDownBlock2D / AttnUpBlock2D, the others DownBlock2D / UpBlock2D; the middle
resnet, attention, resnet -> UNetMidBlock2D; stride-2 conv (pad 1) -> Downsample2D(use_conv);
nearest ×2 + conv -> Upsample2D(use_conv); dropout -> `dropout`.

Not expressible: a `ch_mult` whose first entry is not 1 (diffusers ties the stem width, the
sinusoid width and the time-embedding width to block_out_channels[0]; ours to `ch`). Every preset
has ch_mult[0] = 1; `to_diffusers` refuses the others rather than exporting a different network.

The scheduler: diffusers builds a linear spec's β in float32 (torch.linspace), ours in float64
cast to float32, which differ by up to 2e-9; so the config carries our β as `trained_betas`
(bit for bit). diffusers multiplies ᾱ_t out in float32 where we do it in float64, so its ᾱ_t
differ from ours by ≤ 3e-7 (absolute) whatever the config says. A DDIM scheduler built from
`scheduler_config(schedule, "ddim")` (leading spacing = our `ddim_timesteps`, x̂_0 clipped,
ᾱ_prev = 1 at the last step) reproduces our `ddim_sample` when stepped with
`use_clipped_model_output=True`: a step argument, not a config key, so a plain
`scheduler.step(eps, t, x)` keeps the unclipped ε in the direction term where ours re-derives ε
from the clipped x̂_0. `"ddpm"` (fixed_large variance, unclipped) is our ancestral `ddpm_sample`
up to ~1e-4 at the last steps, where diffusers recomputes β_t = 1 − ᾱ_t/ᾱ_{t−1} from its float32
ᾱ instead of using the β table.
"""
from __future__ import annotations

import torch
from torch import nn

from models.diffusion.schedule import NoiseSchedule
from models.diffusion.unet import AttnBlock, ResBlock, UNet, UNetConfig, _Upsample

NORM_EPS = 1e-5  # torch.nn.GroupNorm's default, what every norm of our UNet uses
SCHEDULER_KINDS = ("ddim", "ddpm")


def unet2d_config(cfg: UNetConfig, sample_size: int | None = None) -> dict:
    """The `UNet2DModel(**config)` arguments that build our network's architecture."""
    if cfg.ch_mult[0] != 1:
        raise ValueError(f"ch_mult {tuple(cfg.ch_mult)} starts at {cfg.ch_mult[0]}, not 1: diffusers' UNet2DModel "
                         "cannot express it (its stem and time embedding are as wide as the first level)")
    widths = [cfg.ch * m for m in cfg.ch_mult]
    attn = [level in cfg.attn_levels for level in range(len(widths))]
    # one head everywhere: head dim = the block's width. One int says so when every attention block
    # (the attention levels and the middle) is as wide; None makes diffusers use each block's width.
    attn_widths = {w for w, a in zip(widths, attn) if a} | {widths[-1]}
    return dict(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2D",
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks, mid_block_scale_factor=1,
        downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=float(cfg.dropout),
        act_fn="silu", attention_head_dim=attn_widths.pop() if len(attn_widths) == 1 else None,
        norm_num_groups=cfg.norm_groups, attn_norm_num_groups=None, norm_eps=NORM_EPS,
        resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
        num_class_embeds=cfg.num_classes + 1,
    )


def _sinusoid_permutation(dim: int) -> torch.Tensor:
    """Column j of diffusers' [cos f_0.., sin f_0..] embedding is column perm[j] of our interleaved one."""
    half = torch.arange(dim // 2)
    return torch.cat([2 * half + 1, 2 * half])  # (dim,): cos f_i sits at 2i+1 in ours, sin f_i at 2i


def _affine(out: dict, prefix: str, module: nn.Module, weight: torch.Tensor | None = None) -> None:
    out[f"{prefix}.weight"] = (module.weight if weight is None else weight).detach().clone()
    out[f"{prefix}.bias"] = module.bias.detach().clone()


def _resnet(out: dict, prefix: str, block: ResBlock) -> None:
    _affine(out, f"{prefix}.norm1", block.block1[0])
    _affine(out, f"{prefix}.conv1", block.block1[2])
    _affine(out, f"{prefix}.time_emb_proj", block.temb_proj[1])
    _affine(out, f"{prefix}.norm2", block.block2[0])
    _affine(out, f"{prefix}.conv2", block.block2[3])
    if isinstance(block.shortcut, nn.Conv2d):
        _affine(out, f"{prefix}.conv_shortcut", block.shortcut)


def _attention(out: dict, prefix: str, attn: AttnBlock) -> None:
    C = attn.norm.num_channels
    _affine(out, f"{prefix}.group_norm", attn.norm)
    w = attn.qkv.weight.detach().reshape(3, C, C)  # (3C, C, 1, 1): output channels q | k | v, as forward splits them
    b = attn.qkv.bias.detach().reshape(3, C)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{prefix}.{name}.weight"] = w[i].clone()
        out[f"{prefix}.{name}.bias"] = b[i].clone()
    _affine(out, f"{prefix}.to_out.0", attn.proj, attn.proj.weight.reshape(C, C))


def _block(out: dict, prefix: str, index: int, block: ResBlock) -> None:
    """A ResBlock -> resnets.<index> (and attentions.<index> when it carries attention)."""
    _resnet(out, f"{prefix}.resnets.{index}", block)
    if isinstance(block.attn, AttnBlock):
        _attention(out, f"{prefix}.attentions.{index}", block.attn)


def convert_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under UNet2DModel's names (see the module docstring for the three reshapes)."""
    cfg, out = net.cfg, {}
    first, second = net.time_mlp[0], net.time_mlp[2]
    _affine(out, "time_embedding.linear_1", first, first.weight[:, _sinusoid_permutation(cfg.ch)])
    _affine(out, "time_embedding.linear_2", second)
    labels = net.label_emb.weight.detach().clone()  # (num_classes + 1, 4ch)
    if cfg.cond_drop == "batch":  # our forward adds nothing for the null label
        labels[net.null_label] = 0.0
    out["class_embedding.weight"] = labels
    _affine(out, "conv_in", net.head)

    level, index = 0, 0
    for layer in net.down:  # per level: num_res_blocks ResBlocks, then a stride-2 conv except at the last
        if isinstance(layer, ResBlock):
            _block(out, f"down_blocks.{level}", index, layer)
            index += 1
        else:
            _affine(out, f"down_blocks.{level}.downsamplers.0.conv", layer)
            level, index = level + 1, 0

    _resnet(out, "mid_block.resnets.0", net.middle[0])
    _attention(out, "mid_block.attentions.0", net.middle[0].attn)
    _resnet(out, "mid_block.resnets.1", net.middle[1])

    level, index = 0, 0
    for layer in net.up:  # per level, deepest first: num_res_blocks + 1 ResBlocks, then an upsample except at the last
        if isinstance(layer, ResBlock):
            _block(out, f"up_blocks.{level}", index, layer)
            index += 1
        elif isinstance(layer, _Upsample):
            _affine(out, f"up_blocks.{level}.upsamplers.0.conv", layer.conv)
            level, index = level + 1, 0

    _affine(out, "conv_norm_out", net.tail[0])
    _affine(out, "conv_out", net.tail[2])
    return out


def to_diffusers(net: UNet, sample_size: int | None = None):
    """A diffusers `UNet2DModel` computing the same ε̂(x_t, t, y) as `net` (eval mode, float32).

    Call it as `model(x_t, t, class_labels=y).sample`; y = num_classes is the null label.
    `sample_size` (the training resolution) is metadata only: both networks take any size
    divisible by 2^(len(ch_mult) − 1)."""
    from diffusers import UNet2DModel

    model = UNet2DModel(**unet2d_config(net.cfg, sample_size))
    model.load_state_dict(convert_state_dict(net), strict=True)
    return model.eval()


def scheduler_config(schedule: NoiseSchedule, kind: str = "ddim") -> dict:
    """A diffusers DDIMScheduler ("ddim") or DDPMScheduler ("ddpm") config with our β_t, bit for bit.

    ddim: leading spacing (T//steps stride ending at t = 0, our `ddim_timesteps`), x̂_0 clipped to
    [−1, 1] and ε re-derived from it, the last step to ᾱ = 1: our `ddim_sample`.
    ddpm: σ_t² = β_t ("fixed_large"), unclipped x̂_0: our ancestral `ddpm_sample` default."""
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler kind {kind!r}: use one of {', '.join(SCHEDULER_KINDS)}")
    betas = schedule.betas  # (T,) float32
    common = dict(
        num_train_timesteps=int(schedule.T), beta_start=float(betas[0]), beta_end=float(betas[-1]),
        # ignored when trained_betas is given; says where the betas come from
        beta_schedule="linear" if schedule.kind == "linear" else "squaredcos_cap_v2",
        trained_betas=[float(b) for b in betas], prediction_type="epsilon", clip_sample_range=1.0,
        timestep_spacing="leading", steps_offset=0, thresholding=False,
    )
    if kind == "ddim":
        return {"_class_name": "DDIMScheduler", **common, "clip_sample": True, "set_alpha_to_one": True}
    return {"_class_name": "DDPMScheduler", **common, "clip_sample": False, "variance_type": "fixed_large"}


def build_scheduler(schedule: NoiseSchedule, kind: str = "ddim"):
    """The diffusers scheduler object of `scheduler_config(schedule, kind)`."""
    import diffusers

    config = scheduler_config(schedule, kind)
    return getattr(diffusers, config["_class_name"]).from_config(config)
