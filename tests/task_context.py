"""The RunContext a task's ``runner_parts`` receives, built as the shared runner builds it (its own
``run_context``, the backbone's real look-up, the per-size resolution), for tests that build configs."""

from pathlib import Path


def run_context_for(task, p: dict, data, predictions_dir: Path, backbone: str = "4m-tiny", seed: int = 0):
    from fourm_eval.backbones import backbone_info
    from fourm_eval.tasks.profiles import resolve_per_size, resolve_size
    from fourm_eval.tasks.runner import run_context

    info = backbone_info(backbone, None, False)
    size, _ = resolve_size(info["embed_dim"], info["num_layers"], None)
    p = resolve_per_size(p, size)
    p["model_size"] = size
    return run_context(task, p, data, name=backbone, checkpoint=None, info=info,
                       options=task.backbone_options(p, backbone, info), world=1, seed=seed,
                       predictions_dir=predictions_dir)


def build_task_model(task_name: str, root: Path, backbone: str, tmp: Path, sets: dict | None = None):
    """The model `fourm-eval run TASK --backbone BACKBONE --random-init` trains, built the runner's way
    (profile, data check, run context, the task's parts, mmengine's registry under the task's scope),
    without training it; with the layer-decay groups the optimiser would get."""
    from mmengine.registry import MODELS, DefaultScope

    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.mm import layer_decay_groups
    from fourm_eval.tasks.profiles import load_profile

    task = get_task(task_name)
    p = {**load_profile(task_name, "smoke"), **(sets or {})}
    data = task.check_data(root, p, skip_bad_images=False, out_dir=tmp / "data", log=lambda *_: None)
    ctx = run_context_for(task, p, data, tmp / "predictions", backbone=backbone)
    task.register_mm()
    with DefaultScope.overwrite_default_scope(task.mm_scope):
        model = MODELS.build(task.runner_parts(ctx)["model"])
    groups = layer_decay_groups(model, model.backbone.net, "backbone.net.", 1e-3, 0.05, 0.9)
    return model, groups
