"""The Alice objective on nnU-Net's planned CNN U-Net (Jiang et al., ICCV 2023; docs/method.md).

    L = λ1 · L_cls  (Eq. 1, DINO cross-view CE on the pooled bottleneck, teacher(Q)↔student(K) and back; the
                     student's K unmasked by default, masked as in the paper with --cls-student-view masked)
      + λk · L_koleo (spread of the student's CLS embeddings against a memory of earlier ones; koleo.py)
      + λ2 · L_casa (Eq. 2, CE between CASA outputs S (online) and T (target), per view; off by default, --casa:
                     it cost probe Dice on the demo, docs/results.md)
      + λ3 · L_rec  (masked image modelling through the decoder and a separate head, MSE on masked voxels
                     against the view without intensity augmentation; SparK-style masking: objectives/sparse.py)

Mapping to a CNN U-Net: CLS = the bottleneck's output tokens through a per-token MLP, averaged and standardised
(``heads.ClsPooling``; the plain pool of the normed output is nearly the same vector for every image); encoder
tokens = bottleneck voxels; decoder tokens = voxels of the lowest-resolution decoder stage; linear projections
sized from the plan's ``features_per_stage`` feed one DINO head (shared MLP + prototypes) whose logits CASA aligns
(the official code's placement). The teacher is an EMA copy of the whole
student (network, projections, pooling, head). CASA's target T is computed from teacher tokens only
(``casa.CasaAlignment.target``) and its CE is taken on the tokens whose region was masked in the student view.
Teacher targets: Sinkhorn-Knopp over the batch and a queue of centred earlier rows by default, DINO's centre as an
option (``losses``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_alice.pretrain.objectives.casa import CasaAlignment
from nnunet_alice.pretrain.objectives.ema import EmaTeacher
from nnunet_alice.pretrain.objectives.koleo import KoLeoMemory
from nnunet_alice.pretrain.objectives.heads import (ClsPooling, DinoHead, PreNormTap, TokenProjection, cls_features,
                                                    decoder_bottleneck_tap)
from nnunet_alice.pretrain.objectives.losses import (CasaTokenLoss, DinoCrossViewLoss, kl_to_uniform, probs_entropy,
                                                     probs_kl_to_uniform, teacher_entropy)
from nnunet_alice.pretrain.model import UNetFeatures, feature_channels
from nnunet_alice.pretrain.objectives.mae import input_channels
from nnunet_alice.pretrain.objectives.sparse import SparseMaskedModel, mim_loss


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
        self.cls_pool = ClsPooling(dim, config.cls_pool, hidden_dim=dim)
        self._prenorm = PreNormTap(network) if self.cls_pool.uses_prenorm else None  # hook holder
        self._enc_in = decoder_bottleneck_tap(network)  # encoder tokens as the decoder receives them

    def encode(self, x: torch.Tensor, need_tokens: bool = True, update_stats: bool = False,
               visible: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``visible`` (B, 1, *S), 1 = visible: the CLS pools only tokens with a visible voxel (sparse encoder);
        ``update_stats``: update the CLS standardisation with this batch (once per training step and branch)."""
        f = self._features(x)
        pooled = cls_features(self.cls_pool, f, self._prenorm)
        weights = token_fraction(visible, pooled.shape[2:]).gt(0) if visible is not None else None
        enc = self._enc_in.pop() if self._enc_in is not None else f["bottleneck"]
        cls, z = self.head(self.cls_pool(pooled, update_stats, weights), with_embedding=True)
        out = {"recon": f["recon"], "cls": cls, "cls_z": z, "grid": tuple(enc.shape[2:])}
        if need_tokens:
            out["enc"] = self.head(self.proj_enc(enc))
            out["dec"] = self.head(self.proj_dec(f["decoder"]))
        return out

    def encode_cls(self, x: torch.Tensor, update_stats: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """CLS logits and embedding ``z`` of unmasked views from the encoder alone (the decoder is not run)."""
        pooled = cls_features(self.cls_pool, self._features.encoder(x), self._prenorm)
        return self.head(self.cls_pool(pooled, update_stats), with_embedding=True)


def token_fraction(mask: torch.Tensor, grid) -> torch.Tensor:
    """(B, 1, *S) voxel mask -> (B, N): the fraction of each token's voxels that are set, tokens in C order."""
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    return pool(mask.float(), tuple(int(g) for g in grid)).flatten(1)


class AliceObjective(nn.Module):
    def __init__(self, network: nn.Module, config, schedules):
        super().__init__()
        self.config = config
        self.schedules = schedules
        self.student = AliceStudent(network, config)
        self.teacher = EmaTeacher(self.student)
        # masking of the student's views and the reconstruction head (sparse.py); after the teacher copy
        self.mim = SparseMaskedModel(network, input_channels(network), config.masking, with_head=config.use_recon)
        k = config.head_out_dim
        self.casa = CasaAlignment(dim=k, num_heads=config.casa_heads, dropout=config.casa_dropout,
                                  ema_target=config.casa_target == "teacher_encoder_ema")
        self.cls_loss = DinoCrossViewLoss(k, config.student_temp, config.center_momentum, config.centering,
                                          config.sinkhorn_iterations, config.cls_queue_size)
        self.casa_loss = CasaTokenLoss(k, config.student_temp, config.center_momentum, config.centering,
                                       config.sinkhorn_iterations, config.casa_queue_size)
        self.koleo = KoLeoMemory(config.head_bottleneck_dim, config.koleo_memory)
        self.freeze_last_layer_steps = int(schedules.freeze_last_layer_steps)

    @property
    def network(self) -> nn.Module:
        return self.student.network

    def enable_compile(self) -> None:
        """torch.compile the student network's forward (checkpoints keep nnU-Net's plain key layout)."""
        self.student._features.compile()

    @property
    def uses_every_parameter(self) -> bool:
        """False when a term is off: its modules (CASA, the token projections, the CLS pool, decoder stages only
        the reconstruction reads) then get no gradient (training/distributed.py)."""
        cfg = self.config
        return bool(cfg.use_cls and cfg.use_casa and cfg.use_recon)

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
        whole = None
        if cfg.use_cls and cfg.cls_student_view == "unmasked":   # the CLS term reads an encoder pass on whole views
            whole = self.student.encode_cls(views, update_stats=True)
        with self.mim.masked(masks):
            s = self.student.encode(views * (1.0 - masks), need_tokens=cfg.use_casa, update_stats=whole is None,
                                    visible=1.0 - masks if cfg.masking == "spark" else None)
        if whole is not None:                                     # the masked pass keeps MIM and CASA
            s["cls"], s["cls_z"] = whole
        with torch.no_grad():
            t = self.teacher.module.encode(torch.cat([batch["teacher_q"], batch["teacher_k"]]),
                                           need_tokens=cfg.use_casa, update_stats=True)
        s_cls, t_cls = s["cls"].float(), t["cls"].float()
        terms: Dict[str, torch.Tensor] = {}
        total = s_cls.new_zeros(())
        if cfg.use_cls:
            terms["cls"] = self.cls_loss(s_cls[:b], s_cls[b:], t_cls[:b], t_cls[b:], temp)
            total = total + cfg.lambda_cls * terms["cls"]
            if cfg.koleo_weight > 0:                       # keeps the student's CLS embeddings spread (koleo.py)
                terms["koleo"] = self.koleo(s["cls_z"].float())
                total = total + cfg.koleo_weight * terms["koleo"]
        if cfg.use_casa:
            online = self.casa(s["enc"].float(), s["dec"].float())
            target_tokens = t["enc"] if cfg.casa_target == "teacher_encoder_ema" else t["dec"]
            target = self.casa.target(t["enc"].float(), target_tokens.float(), mode=cfg.casa_target)
            masked = token_fraction(masks, s["grid"]).ge(0.5)  # tokens whose region the student did not see
            terms["casa"] = self.casa_loss([online[:b], online[b:]], [target[:b], target[b:]], temp,
                                           [masked[:b], masked[b:]])
            total = total + cfg.lambda_casa * terms["casa"]
        if cfg.use_recon:
            targets = torch.cat([batch.get("target_q", batch["student_q"]), batch.get("target_k", batch["student_k"])])
            terms["recon"] = mim_loss(self.mim.reconstruction(), targets, masks, cfg.recon_region,
                                      cfg.recon_norm_target, cfg.mask_block_size)
            total = total + cfg.lambda_recon * terms["recon"]
        with torch.no_grad():
            # monitors of the targets the student is trained towards (CLS; CASA when the CLS term is off)
            used = self.cls_loss.last_targets if cfg.use_cls else self.casa_loss.last_targets
            if used is not None:
                terms["teacher_entropy"], terms["kl_uniform"] = probs_entropy(used), probs_kl_to_uniform(used)
            else:
                terms["teacher_entropy"] = teacher_entropy(t_cls, self.cls_loss.center, temp)
                terms["kl_uniform"] = kl_to_uniform(t_cls, self.cls_loss.center, temp)
            if cfg.use_cls and self.student.cls_pool.standardise:   # the teacher CLS's own variation
                terms["cls_spread"] = self.teacher.module.cls_pool.relative_spread()
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
