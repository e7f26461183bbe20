"""The Alice objective on nnU-Net's planned CNN U-Net (Jiang et al., ICCV 2023; docs/method.md).

    L = λ1 · L_cls  (Eq. 1, DINO cross-view CE on the pooled bottleneck, teacher(Q)↔student(masked K) and back)
      + λ2 · L_casa (Eq. 2, CE between CASA outputs S (online) and T (target), per view)
      + λ3 · L_rec  (masked image modelling through the decoder and a separate head, MSE on masked voxels
                     against the view without intensity augmentation; SparK-style masking: pretrain/sparse.py)

Mapping to a CNN U-Net: CLS = global average pool of the bottleneck; encoder tokens = bottleneck voxels;
decoder tokens = voxels of the lowest-resolution decoder stage; linear projections sized from the plan's
``features_per_stage`` feed one DINO head (shared MLP + prototypes) whose logits CASA aligns (the official
code's placement). The teacher is an EMA copy of the whole student (network, projections, head).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from nnunet_alice.pretrain.casa import CasaAlignment
from nnunet_alice.pretrain.ema import EmaTeacher
from nnunet_alice.pretrain.heads import DinoHead, TokenProjection, global_pool_tokens
from nnunet_alice.pretrain.losses import (CasaTokenLoss, DinoCrossViewLoss, kl_to_uniform, teacher_entropy)
from nnunet_alice.pretrain.model import UNetFeatures, feature_channels
from nnunet_alice.pretrain.objective_mae import input_channels
from nnunet_alice.pretrain.sparse import SparseMaskedModel, mim_loss


class AliceStudent(nn.Module):
    """Planned network + token projections + DINO head: ``encode(x)`` → reconstruction and head logits."""

    def __init__(self, network: nn.Module, config, decoder_stage: int = 0):
        super().__init__()
        self.network = network
        ch = feature_channels(network, decoder_stage)
        dim = ch["bottleneck"]
        self.proj_enc = TokenProjection(ch["bottleneck"], dim)
        self.proj_dec = TokenProjection(ch["decoder"], dim)
        self.head = DinoHead(dim, config.head_hidden_dim, config.head_bottleneck_dim, config.head_out_dim)
        self._features = UNetFeatures(network, decoder_stage)  # hook holder, not a submodule

    def encode(self, x: torch.Tensor, need_tokens: bool = True) -> Dict[str, torch.Tensor]:
        f = self._features(x)
        out = {"recon": f["recon"], "cls": self.head(global_pool_tokens(f["bottleneck"]))}
        if need_tokens:
            out["enc"] = self.head(self.proj_enc(f["bottleneck"]))
            out["dec"] = self.head(self.proj_dec(f["decoder"]))
        return out


class AliceObjective(nn.Module):
    def __init__(self, network: nn.Module, config, schedules):
        super().__init__()
        self.config = config
        self.schedules = schedules
        self.student = AliceStudent(network, config)
        self.teacher = EmaTeacher(self.student)
        # masking of the student's views and the reconstruction head (pretrain/sparse.py); after the teacher copy
        self.mim = SparseMaskedModel(network, input_channels(network), config.masking, with_head=config.use_recon)
        k = config.head_out_dim
        self.casa = CasaAlignment(dim=k, num_heads=config.casa_heads, dropout=config.casa_dropout,
                                  ema_target=config.casa_target == "teacher_encoder_ema")
        self.cls_loss = DinoCrossViewLoss(k, config.student_temp, config.center_momentum)
        self.casa_loss = CasaTokenLoss(k, config.student_temp, config.center_momentum)
        self.freeze_last_layer_steps = int(round(config.freeze_last_layer_fraction * schedules.total_steps))

    @property
    def network(self) -> nn.Module:
        return self.student.network

    def enable_compile(self) -> None:
        """torch.compile the student network's forward (checkpoints keep nnU-Net's plain key layout)."""
        self.student._features.compile()

    def student_modules(self) -> Dict[str, nn.Module]:
        mods = {"student": self.student, "mim": self.mim}
        if self.config.use_casa:
            mods["casa"] = self.casa
        return mods

    def forward(self, batch: Dict[str, torch.Tensor], step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cfg = self.config
        temp = float(self.schedules.teacher_temp[min(step, self.schedules.total_steps - 1)])
        b = batch["student_q"].shape[0]
        views = torch.cat([batch["student_q"], batch["student_k"]])
        masks = torch.cat([batch["mask_q"], batch["mask_k"]])
        with self.mim.masked(masks):
            s = self.student.encode(views * (1.0 - masks), need_tokens=cfg.use_casa)
        with torch.no_grad():
            t = self.teacher.module.encode(torch.cat([batch["teacher_q"], batch["teacher_k"]]),
                                           need_tokens=cfg.use_casa)
        s_cls, t_cls = s["cls"].float(), t["cls"].float()
        terms: Dict[str, torch.Tensor] = {}
        total = s_cls.new_zeros(())
        if cfg.use_cls:
            terms["cls"] = self.cls_loss(s_cls[:b], s_cls[b:], t_cls[:b], t_cls[b:], temp)
            total = total + cfg.lambda_cls * terms["cls"]
        if cfg.use_casa:
            query = s["enc"].float()
            online = self.casa(query, s["dec"].float())
            target_tokens = t["enc"] if cfg.casa_target == "teacher_encoder_ema" else t["dec"]
            target = self.casa.target(query, target_tokens.float(), mode=cfg.casa_target)
            terms["casa"] = self.casa_loss([online[:b], online[b:]], [target[:b], target[b:]], temp)
            total = total + cfg.lambda_casa * terms["casa"]
        if cfg.use_recon:
            targets = torch.cat([batch.get("target_q", batch["student_q"]), batch.get("target_k", batch["student_k"])])
            terms["recon"] = mim_loss(self.mim.reconstruction(), targets, masks, cfg.recon_region,
                                      cfg.recon_norm_target, cfg.mask_block_size)
            total = total + cfg.lambda_recon * terms["recon"]
        with torch.no_grad():
            terms["teacher_entropy"] = teacher_entropy(t_cls, self.cls_loss.center, temp)
            terms["kl_uniform"] = kl_to_uniform(t_cls, self.cls_loss.center, temp)
        return total, terms

    def before_optimizer_step(self, step: int) -> None:
        """Freeze the prototypes early on (DINO's ``freeze_last_layer``) by dropping their gradients."""
        if step < self.freeze_last_layer_steps:
            self.student.head.cancel_last_layer_gradients()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        m = float(self.schedules.momentum[min(step, self.schedules.total_steps - 1)])
        self.teacher.update(self.student, m)
        if self.config.use_casa and self.config.casa_target == "teacher_encoder_ema":
            self.casa.update_target(m)
