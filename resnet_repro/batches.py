"""How a step of the recipe's global batch is cut over processes, forward passes and BatchNorm groups.

A recipe's `gpus x batch_per_gpu` images make one optimizer step whatever the world size. Each of
`world` processes takes `device_batch` = global / world images per step, in forward passes of
`forward_batch` images (more than one pass = gradient accumulation). BatchNorm normalises groups of
`bn_group` images (default: the recipe's per-GPU batch) inside each pass — what the recipe's GPUs
did without SyncBN. By default a GPU runs the device batch in one pass (small passes are launch-bound
there) and a CPU in passes of one BN group (small passes run faster there, in cache: figures in the
README's Performance section): the same computation either way.
Recipes with SyncBN normalise over the whole pass on every process together (CUDA only), so their passes
are `bn_group` images and there are no groups within a pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resnet_repro.errors import UserError
from resnet_repro.identity import Deviation, batchnorm_deviation


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world: int
    device_batch: int
    forward_batch: int
    bn_group: int
    sync_bn: bool  # SyncBN across the processes is active
    recipe_bn_images: int  # images behind each BN statistic in the recipe

    @property
    def accum_steps(self) -> int:
        """Forward passes per optimizer step."""
        return self.device_batch // self.forward_batch

    @property
    def bn_groups_per_pass(self) -> int:
        return 1 if self.sync_bn else self.forward_batch // self.bn_group

    @property
    def bn_images(self) -> int:
        """Images behind each BN statistic in this run."""
        return self.bn_group * (self.world if self.sync_bn else 1)

    def bn_deviation(self) -> Deviation | None:
        return batchnorm_deviation(self.bn_images, self.recipe_bn_images)

    def params(self) -> dict[str, int]:
        """What the run's MLflow params say about how a step executes (runs before these names logged
        `batch_micro` for batch_bn_group and `bn_group` for bn_images)."""
        return {
            "batch_global": self.global_batch,
            "batch_per_device": self.device_batch,
            "batch_forward": self.forward_batch,
            "batch_bn_group": self.bn_group,
            "bn_images": self.bn_images,
            "accum_steps": self.accum_steps,
        }


def plan(cfg: Mapping[str, Any], world: int) -> BatchPlan:
    """The plan of a composed config on `world` processes; a UserError when the batches do not split. Made by
    config.validate (a check before any job starts) and once by each job, whose RunInfo carries it to the engine."""
    from resnet_repro.distributed import uses_cuda  # torch: imported where a plan is made, not by its readers

    recipe, trainer = cfg["recipe"], cfg["trainer"]
    gpus, per_gpu = int(recipe["gpus"]), int(recipe["batch_per_gpu"])
    total = gpus * per_gpu
    if total % world:
        raise UserError(
            f"the global batch {total} ({gpus}x{per_gpu}) does not split over {world} processes; "
            f"use a world size dividing {total}"
        )
    device_batch = total // world
    group = int(trainer["micro_batch"] or per_gpu)
    recipe_sync = bool(recipe["model"].get("sync_bn"))
    forward = trainer["forward_batch"]
    if recipe_sync and forward is not None and int(forward) != group:
        raise UserError(
            f"trainer.forward_batch={forward} cannot differ from the BN batch {group} of a SyncBN recipe; "
            f"allowed: null (set trainer.micro_batch instead)"
        )
    cuda = uses_cuda(str(trainer["device"]))
    pass_size = group if recipe_sync else int(forward or (device_batch if cuda else group))
    if device_batch % pass_size:
        what = f"trainer.forward_batch={forward}" if forward else f"trainer.micro_batch={group}"
        raise UserError(f"{what} does not divide the per-device batch {device_batch}")
    if pass_size % group:
        where = f"the forward pass of {pass_size}" if forward else f"the per-device batch {device_batch}"
        raise UserError(f"trainer.micro_batch={group} does not divide {where}")
    return BatchPlan(
        global_batch=total,
        world=world,
        device_batch=device_batch,
        forward_batch=pass_size,
        bn_group=group,
        sync_bn=recipe_sync and world > 1 and cuda,  # SyncBN: CUDA only
        recipe_bn_images=per_gpu * (gpus if recipe_sync else 1),
    )
