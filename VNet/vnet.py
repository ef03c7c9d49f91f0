"""V-Net for volumetric segmentation, as mattmacy/vnet.pytorch@a00c8ea builds it.

Paper: F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net: Fully Convolutional Neural Networks for Volumetric
Medical Image Segmentation", 3DV 2016. The number of convolutions per stage follows the authors' prototxt
(1, 2, 3, 2 down; 2, 2, 1, 1 up), not the paper's figure, as in the reference.

Module and attribute names are the reference's, so its `state_dict` (202 tensors; 45,603,934 parameters
with PReLU, 45,600,316 with ELU) loads with `strict=True` once a DataParallel `module.` prefix is removed.

Deliberate fixes of the reference:
  * The input block adds the input, replicated 16 times along the CHANNEL axis, to the first conv's output.
    The reference concatenated along the batch axis, which only worked for batch 1 on PyTorch 0.1.x
    (mattmacy/vnet.pytorch#1, #21); today it silently multiplies the batch by 16 or crashes.
  * Plain `nn.BatchNorm3d` (same keys, `bn1`). The reference's ContBatchNorm3d normalised with batch
    statistics even in eval mode, so a prediction depended on the other samples in its batch, and it
    raises NotImplementedError on current PyTorch. Here eval mode uses the running statistics; to
    reproduce the reference at inference, keep the BatchNorm modules in train mode.
  * The output is raw logits shaped (N, 2, D, H, W). The reference returned
    `log_softmax` (nll=True) or `softmax` of the logits permuted to channels-last and flattened to
    (N*D*H*W, 2); `to_reference_output` produces exactly that from our logits. Channel 1 is foreground.
  * The dropout on the skip connection (always Dropout3d(0.5) in training, in every up stage, whatever
    the stage's dropout flag) is kept by default and can be switched off with `skip_dropout=False`.
  * The input is checked: 1 channel and D, H, W divisible by 16, with a message naming the padded size.
  * Optional gradient checkpointing of the down and up stages (`checkpoint_stages=True`) for big volumes.

Default initialisation is PyTorch's, as in the reference class; the reference's train.py then applied
`reference_weights_init_` (Kaiming-normal Conv3d weights, zero bias).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DIVISOR = 16  # four stride-2 stages


def _activation(elu: bool, channels: int) -> nn.Module:
    """ELU, or PReLU with one slope per channel (what the reference's train.py uses, elu=False)."""
    return nn.ELU(inplace=True) if elu else nn.PReLU(channels)


def _dropout(enabled: bool) -> nn.Module:
    # Identity keeps the attribute a module in both cases; neither has parameters, so keys do not change.
    return nn.Dropout3d(p=0.5) if enabled else nn.Identity()


def _is_tracing() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        import torch._dynamo as dynamo

        is_compiling = dynamo.is_compiling
    return bool(is_compiling())


def check_input_shape(shape: torch.Size | tuple[int, ...]) -> None:
    """Raise ValueError unless `shape` is (N, 1, D, H, W) with D, H, W positive multiples of 16."""
    if len(shape) != 5 or shape[1] != 1:
        raise ValueError(f"VNet expects input (N, 1, D, H, W) with 1 channel, got shape {tuple(shape)}")
    spatial = [int(s) for s in shape[2:]]
    if all(s > 0 and s % DIVISOR == 0 for s in spatial):
        return
    padded = [max(DIVISOR, -(-s // DIVISOR) * DIVISOR) for s in spatial]
    raise ValueError(
        f"input {'x'.join(str(s) for s in [1, *spatial])} needs D, H, W divisible by {DIVISOR}: "
        f"pad to {'x'.join(str(s) for s in padded)}"
    )


def to_reference_output(logits: torch.Tensor, nll: bool = True) -> torch.Tensor:
    """The reference's output layout: (N*D*H*W, 2) log-probabilities (nll=True) or probabilities.

    Rows run over N, D, H, W in C order (channels-last, flattened), columns are the classes.
    """
    flat = logits.permute(0, 2, 3, 4, 1).reshape(-1, logits.shape[1])
    return F.log_softmax(flat, dim=1) if nll else F.softmax(flat, dim=1)


class LUConv(nn.Module):
    """5x5x5 conv (padding 2) -> BatchNorm -> activation, channels unchanged."""

    def __init__(self, nchan: int, elu: bool):
        super().__init__()
        self.relu1 = _activation(elu, nchan)
        self.conv1 = nn.Conv3d(nchan, nchan, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm3d(nchan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.bn1(self.conv1(x)))


def _make_n_conv(nchan: int, depth: int, elu: bool) -> nn.Sequential:
    return nn.Sequential(*(LUConv(nchan, elu) for _ in range(depth)))


class InputTransition(nn.Module):
    """1 -> 16 channels: 5x5x5 conv + BN, plus the input replicated on 16 channels, then activation."""

    def __init__(self, out_chans: int = 16, elu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv3d(1, out_chans, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm3d(out_chans)
        self.relu1 = _activation(elu, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        # The 1-channel input broadcasts over the 16 channels: the paper's residual with the input
        # replicated channel-wise (the reference concatenated copies on the batch axis by mistake).
        return self.relu1(out + x.expand_as(out))


class DownTransition(nn.Module):
    """Strided 2x2x2 conv doubling the channels, then `n_convs` LUConvs with a residual connection."""

    def __init__(self, in_chans: int, n_convs: int, elu: bool, dropout: bool = False):
        super().__init__()
        out_chans = 2 * in_chans
        self.down_conv = nn.Conv3d(in_chans, out_chans, kernel_size=2, stride=2)
        self.bn1 = nn.BatchNorm3d(out_chans)
        self.relu1 = _activation(elu, out_chans)
        self.relu2 = _activation(elu, out_chans)
        self.do1 = _dropout(dropout)
        self.ops = _make_n_conv(out_chans, n_convs, elu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.relu1(self.bn1(self.down_conv(x)))
        out = self.ops(self.do1(down))
        return self.relu2(out + down)


class UpTransition(nn.Module):
    """2x2x2 transposed conv to out_chans/2, cat [upsampled, skip], `n_convs` LUConvs, residual."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        n_convs: int,
        elu: bool,
        dropout: bool = False,
        skip_dropout: bool = True,
    ):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_chans, out_chans // 2, kernel_size=2, stride=2)
        self.bn1 = nn.BatchNorm3d(out_chans // 2)
        self.do1 = _dropout(dropout)
        # The reference drops half of the skip's channels in training in every up stage.
        self.do2 = _dropout(skip_dropout)
        self.relu1 = _activation(elu, out_chans // 2)
        self.relu2 = _activation(elu, out_chans)
        self.ops = _make_n_conv(out_chans, n_convs, elu)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.up_conv(self.do1(x))))
        xcat = torch.cat((out, self.do2(skip)), dim=1)
        return self.relu2(self.ops(xcat) + xcat)


class OutputTransition(nn.Module):
    """5x5x5 conv to 2 channels + BN + activation, then a 1x1x1 conv: logits (N, 2, D, H, W)."""

    def __init__(self, in_chans: int, elu: bool):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chans, 2, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm3d(2)
        self.conv2 = nn.Conv3d(2, 2, kernel_size=1)
        self.relu1 = _activation(elu, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu1(self.bn1(self.conv1(x))))


@contextmanager
def _running_stats_untouched(module: nn.Module) -> Iterator[None]:
    """While a checkpointed stage is recomputed, point BatchNorm's running statistics and
    `num_batches_tracked` at throwaway copies: the first pass updated them already, and the recompute
    must save the same tensors as the first pass (so they cannot simply be switched off)."""
    swapped = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(m, name)
                if buffer is not None:
                    swapped.append((m, name, buffer))
                    setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, name, buffer in swapped:
            setattr(m, name, buffer)


class VNet(nn.Module):
    """V-Net (Milletari et al. 2016) with the reference's layers and parameter names.

    Args:
        elu: ELU activations (the reference class default) or, when False, PReLU as the reference's
            train.py builds it (`VNet(elu=False, nll=True)`).
        nll: kept from the reference's signature; the network returns logits either way, and
            `to_reference_output(logits, nll=model.nll)` gives what the reference returned.
        skip_dropout: Dropout3d(0.5) on every skip connection during training, as the reference.
        checkpoint_stages: in training mode, recompute the down and up stages in backward instead of
            storing their activations (torch.utils.checkpoint), trading about one extra forward for memory.

    Input (N, 1, D, H, W) with D, H, W multiples of 16; output logits (N, 2, D, H, W). In training mode
    the BatchNorm at the 1/16 bottleneck needs more than one value per channel, so N*D*H*W/16**3 > 1.

    Example:
        >>> net = VNet(elu=False, nll=True).eval()
        >>> net(torch.zeros(1, 1, 16, 32, 32)).shape
        torch.Size([1, 2, 16, 32, 32])
    """

    def __init__(
        self,
        elu: bool = True,
        nll: bool = False,
        skip_dropout: bool = True,
        checkpoint_stages: bool = False,
    ):
        super().__init__()
        self.elu = elu
        self.nll = nll
        self.checkpoint_stages = checkpoint_stages
        self.in_tr = InputTransition(16, elu)
        self.down_tr32 = DownTransition(16, 1, elu)
        self.down_tr64 = DownTransition(32, 2, elu)
        self.down_tr128 = DownTransition(64, 3, elu, dropout=True)
        self.down_tr256 = DownTransition(128, 2, elu, dropout=True)
        self.up_tr256 = UpTransition(256, 256, 2, elu, dropout=True, skip_dropout=skip_dropout)
        self.up_tr128 = UpTransition(256, 128, 2, elu, dropout=True, skip_dropout=skip_dropout)
        self.up_tr64 = UpTransition(128, 64, 1, elu, skip_dropout=skip_dropout)
        self.up_tr32 = UpTransition(64, 32, 1, elu, skip_dropout=skip_dropout)
        self.out_tr = OutputTransition(32, elu)

    def _stage(self, stage: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if not (self.checkpoint_stages and self.training and torch.is_grad_enabled()):
            return stage(*inputs)
        calls = 0

        def run(*args: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return stage(*args)
            with _running_stats_untouched(stage):
                return stage(*args)

        # Non-reentrant checkpointing restores the RNG state, so dropout masks repeat in the recompute.
        return checkpoint(run, *inputs, use_reentrant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_tracing():
            check_input_shape(x.shape)
        out16 = self.in_tr(x)
        out32 = self._stage(self.down_tr32, out16)
        out64 = self._stage(self.down_tr64, out32)
        out128 = self._stage(self.down_tr128, out64)
        out256 = self._stage(self.down_tr256, out128)
        out = self._stage(self.up_tr256, out256, out128)
        out = self._stage(self.up_tr128, out, out64)
        out = self._stage(self.up_tr64, out, out32)
        out = self._stage(self.up_tr32, out, out16)
        return self.out_tr(out)


def reference_weights_init_(model: nn.Module) -> None:
    """The reference train.py's initialisation: Kaiming-normal (fan-in, ReLU gain) weights and zero bias
    for every Conv3d; transposed convs, BatchNorm and PReLU keep their defaults."""
    for module in model.modules():
        if type(module) is nn.Conv3d:
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
