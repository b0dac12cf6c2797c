"""Typed configuration of a training step.

Every hyperparameter of the learner lives here so that a result file can record exactly what
produced it (``StepConfig.model_dump()``). Defaults follow the literature (DESIGN.md §2);
choices that are ours rather than the paper's are marked as such.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.core.methods import DEFAULT_METHOD, MethodName


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OptimConfig(_Frozen):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(4, ge=1)
    # Ours: a step trains for at least this many optimizer steps (whole epochs, rounded up),
    # so a post of 20 or 100 images gets as many updates as it needs to be learnt (4 epochs of
    # 100 images and 1,200 exemplars are 44 steps); 0 leaves the budget to ``epochs`` alone.
    # A benchmark step of 10,000 images has 79 batches an epoch, so from 2 epochs on this
    # changes nothing there. README, "Choosing the recipe", has the measurements.
    min_steps: int = Field(150, ge=0)
    # Ours: the papers use multi-step decay over 70-160 epochs; with the few epochs a CPU
    # allows, cosine annealing per step converges more reliably. "multistep" is available.
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[float, ...] = Field(
        (0.5, 0.75), description="fractions of the step's epochs where multistep divides lr by 10"
    )
    # Arithmetic of the training forward passes: "auto" is bf16 autocast on a CUDA device that
    # supports it and fp32 elsewhere (on CPU nothing changes, bit for bit); "bf16" asks for
    # autocast on any device, CPU included. Losses are computed in fp32 either way.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class DistillConfig(_Frozen):
    """Knowledge distillation from the frozen previous version (DESIGN.md §1).

    Ours where the paper body could not be read: the total loss is
    ``(1 - lambda) * classification + lambda * T^2 * KL(teacher/T || student/T)`` over the old
    classes' logits (as in End-to-End Incremental Learning and BiC), with ``lambda = old / seen``
    classes when ``weight == "adaptive"``, capped at ``weight_cap``, or a fixed ``weight``.
    """

    enabled: bool = True
    temperature: float = Field(2.0, gt=0)
    weight: float | Literal["adaptive"] = "adaptive"
    # Upper bound on the adaptive weight: with one new class among many old ones, old/seen
    # approaches 1 and leaves the classification loss too little weight to learn the class.
    # README, "Choosing the recipe": 0.5 is ours, measured.
    weight_cap: float = Field(0.5, ge=0, le=1)
    # LUCIR-style cosine feature distillation, added on top with this weight (0 = off).
    feature_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _weight_in_range(self) -> DistillConfig:
        if isinstance(self.weight, float) and not 0.0 <= self.weight <= 1.0:
            raise ValueError("distill.weight must lie in [0, 1] or be 'adaptive'")
        return self

    def weight_for(self, old_classes: int, seen_classes: int) -> float:
        """lambda for a step that adds classes to ``old_classes`` of ``seen_classes``."""
        if self.weight != "adaptive":
            return float(self.weight)
        share = old_classes / seen_classes if seen_classes else 0.0
        return min(share, self.weight_cap)


class PriorConfig(_Frozen):
    """The Balanced Softmax's log-prior, ``tau * log n`` (the paper's is ``tau = 1``; ``tau = 0``
    is plain cross-entropy), and what an old class without a sample this step counts for."""

    tau: float = Field(1.0, ge=0)
    # "masked": log n = -inf, the class leaves the step's softmax (DESIGN.md §1); a number:
    # a virtual count, so that new classes are still set against the old ones (ours).
    absent: Literal["masked"] | float = "masked"

    @model_validator(mode="after")
    def _positive_count(self) -> PriorConfig:
        if isinstance(self.absent, float) and self.absent <= 0:
            raise ValueError("prior.absent must be 'masked' or a positive virtual count")
        return self


MemoryMode = Literal["fixed_total", "fixed_per_class", "none"]


class MemoryConfig(_Frozen):
    """Exemplar memory. The budget mode is explicit because libraries use one flag name
    (``fixed_memory``) for opposite meanings. Size 0 means no memory, whatever the mode
    asked for, so that any preset switches to the memory-free setting with ``size=0``."""

    mode: MemoryMode = "fixed_total"
    size: int = Field(2000, ge=0, description="total exemplars, or exemplars per class")
    selection: Literal["herding", "random"] = "herding"

    @model_validator(mode="before")
    @classmethod
    def _size_zero_is_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("size") == 0:
            return {**data, "mode": "none"}
        return data

    @model_validator(mode="after")
    def _none_means_zero(self) -> MemoryConfig:
        if self.mode == "none" and self.size != 0:
            raise ValueError("memory mode 'none' takes size 0")
        return self

    def quota(self, seen_classes: int) -> int:
        """Exemplars kept per class once ``seen_classes`` classes have been learnt:
        fixed_total M -> M // seen, fixed_per_class m -> m, none -> 0."""
        if seen_classes < 0:
            raise ValueError(f"seen_classes must be >= 0, got {seen_classes}")
        if self.mode == "none" or seen_classes == 0:
            return 0
        if self.mode == "fixed_total":
            return self.size // seen_classes
        return self.size


class AugmentConfig(_Frozen):
    crop: int = Field(32, ge=1)
    pad: int = Field(4, ge=0)
    flip: bool = True
    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)


class ModelConfig(_Frozen):
    backbone: Literal["resnet32", "resnet18", "resnet8"] = "resnet32"
    in_channels: int = Field(3, ge=1)
    # Measured about 1.4x faster for ResNet-32 training on this project's 2-core CPUs.
    channels_last: bool = True


# The hyperparameters of the comparison methods (learner/methods/*), one section per method
# family; a method reads only its own section, and every result records all of them. Each
# method module's docstring says which values follow its paper and which are ours.


class LwFConfig(_Frozen):
    """LwF (Li and Hoiem, 2016): ``CE + weight * KD``; the paper's lambda_o is 1."""

    weight: float = Field(1.0, ge=0)


class BalancedFinetuneConfig(_Frozen):
    """EEIL's class-balanced fine-tuning stage (Castro et al., 2018): the whole network on a
    subset with as many samples per class as an old class has exemplars, at a small lr."""

    # Ours: None is the step's epochs (``optim.epochs``, at least ``optim.min_steps``
    # optimizer steps, as a step resolves them), for one budget across methods. EEIL: 30
    # epochs after 40 of training, i.e. in about the same proportion.
    epochs: int | None = Field(None, ge=1)
    # EEIL fine-tunes at 0.01 after training at 0.1: a tenth of the step's lr.
    lr_factor: float = Field(0.1, gt=0, le=1)


class BiCConfig(_Frozen):
    """BiC (Wu et al., 2019): a balanced held-out split, one (alpha, beta) fitted on it."""

    # The paper splits old exemplars and new data 9:1 into training and validation; the
    # split takes as many samples from each new class as from each old one.
    held_out_fraction: float = Field(0.1, gt=0, lt=1)
    # Ours: the pair is fitted by L-BFGS on the held-out logits (a convex problem, so full
    # batch until converged) instead of the paper's SGD epochs.
    max_iter: int = Field(100, ge=1)
    # ``penalty * ((alpha - 1)^2 + beta^2) / 2`` added to the fit, so that a small held-out
    # set cannot drive the pair to extremes. The BiC code puts 0.1 * beta^2 / 2 on beta; the
    # alpha term is ours.
    penalty: float = Field(0.1, ge=0)


class LucirConfig(_Frozen):
    """LUCIR (Hou et al., 2019) on CIFAR: lambda_base 5, K = 2 hard negatives, margin 0.5,
    margin-ranking weight 1; sigma is learnt and starts at 1."""

    lambda_base: float = Field(5.0, ge=0)
    hard_negatives: int = Field(2, ge=1)
    margin: float = Field(0.5, ge=0)
    margin_weight: float = Field(1.0, ge=0)
    sigma: float = Field(1.0, gt=0)
    # New classes' rows start at their class's mean feature, as the LUCIR code does.
    imprint: bool = True


class StepConfig(_Frozen):
    """Everything one incremental step needs besides data, model, memory, device and RNG."""

    method: MethodName = DEFAULT_METHOD
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    distill: DistillConfig = DistillConfig()
    prior: PriorConfig = PriorConfig()
    memory: MemoryConfig = MemoryConfig()
    augment: AugmentConfig = AugmentConfig()
    eval_batch_size: int = Field(128, ge=1)
    lwf: LwFConfig = LwFConfig()
    balanced_finetune: BalancedFinetuneConfig = BalancedFinetuneConfig()
    bic: BiCConfig = BiCConfig()
    lucir: LucirConfig = LucirConfig()
