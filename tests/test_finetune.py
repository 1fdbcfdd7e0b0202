"""Tests for vitshrink.finetune: the distillation fine-tune (tiny random ViTs, CPU)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vitshrink.errors import VitshrinkError
from vitshrink.finetune import (
    FinetuneConfig,
    FinetuneResult,
    _lr_factor,
    _param_groups,
    distill,
    resolve_mixed_precision,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread, above all on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(patch_size: int = 8, depth: int = 2) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=patch_size,
        embed_dim=48,
        depth=depth,
        num_heads=3,
        num_classes=10,
    )


def teacher_student(seed: int = 0, noise: float = 0.05) -> tuple[nn.Module, nn.Module]:
    """A teacher with confident logits and a student that is a perturbed copy of it."""
    torch.manual_seed(seed)
    teacher = tiny_vit()
    with torch.no_grad():
        teacher.head.weight.mul_(20)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * torch.randn_like(p))
    return teacher, student


def random_set(n: int = 32, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))


def held_out() -> torch.Tensor:
    return torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    student.to(device_of(teacher))
    x = x.to(device_of(teacher))
    with torch.no_grad():
        s, t = student.eval()(x), teacher.eval()(x)
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean").item()


def block_mse(student: nn.Module, teacher: nn.Module, x: torch.Tensor, index: int, tokens: int | None = None) -> float:
    """Normalised MSE between the outputs of ``blocks[index]`` (only the first ``tokens`` if given)."""
    outs: dict[str, torch.Tensor] = {}
    student.to(device_of(teacher))
    x = x.to(device_of(teacher))
    handles = [
        m.blocks[index].register_forward_hook(lambda _m, _a, o, k=k: outs.__setitem__(k, o[:, :tokens]))
        for k, m in (("s", student), ("t", teacher))
    ]
    with torch.no_grad():
        student.eval()(x)
        teacher.eval()(x)
    for h in handles:
        h.remove()
    return (F.mse_loss(outs["s"], outs["t"]) / outs["t"].pow(2).mean()).item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupted(RuntimeError):
    """Stands for a crash or a kill in the middle of a run."""


class Interrupting(Dataset):
    """Wraps a dataset and raises once more than ``limit`` items have been read."""

    def __init__(self, base: Dataset, limit: int) -> None:
        self.base, self.limit, self.reads = base, limit, 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if self.reads > self.limit:
            raise Interrupted("simulated interruption")
        return self.base[i]


def test_distill_lowers_kl_and_keeps_teacher() -> None:
    teacher, student = teacher_student()
    before_teacher = snapshot(teacher)
    x = held_out()
    kl_before = kl(student, teacher, x)
    config = FinetuneConfig(steps=15, lr=1e-3, batch_size=8, temperature=1.0)
    result = distill(student, teacher, random_set(), config, progress=False)
    assert isinstance(result, FinetuneResult)
    assert result.steps_done == 15 and len(result.losses) == 15 and len(result.lrs) == 15
    assert result.resumed_from is None and result.final_loss is not None and result.seconds > 0
    assert result.student is student
    assert not student.training and not teacher.training  # modes restored
    kl_after = kl(student, teacher, x)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert same(before_teacher, snapshot(teacher))
    # warm-up then cosine decay
    assert result.lrs[0] < result.lrs[1] == pytest.approx(1e-3) and result.lrs[-1] < 1e-4


def test_feature_layers_lower_block_mse() -> None:
    teacher, student = teacher_student(seed=2, noise=0.02)
    x = held_out()
    mse_before = block_mse(student, teacher, x, 1)
    config = FinetuneConfig(steps=12, lr=5e-3, batch_size=8, feature_weight=5.0)
    distill(student, teacher, random_set(), config, feature_layers=[1], progress=False)
    mse_after = block_mse(student, teacher, x, 1)
    assert mse_after < 0.7 * mse_before, (mse_before, mse_after)  # KL alone raises it here (~0.25 -> 0.8)
    assert not student.blocks[1]._forward_hooks and not teacher.blocks[1]._forward_hooks


def test_feature_layers_token_mismatch_and_range() -> None:
    torch.manual_seed(0)
    teacher, student = tiny_vit(patch_size=4), tiny_vit(patch_size=8)
    config = FinetuneConfig(steps=2, batch_size=4)
    with pytest.raises(VitshrinkError, match="token counts"):
        distill(student, teacher, random_set(8), config, feature_layers=[0], progress=False)
    assert not student.blocks[0]._forward_hooks and not teacher.blocks[0]._forward_hooks
    with pytest.raises(VitshrinkError, match="out of range"):
        distill(student, teacher, random_set(8), config, feature_layers=[5], progress=False)


def test_prefix_layers_match_class_tokens_across_token_counts() -> None:
    """A student with fewer patch tokens is held to the teacher's class token in every block."""
    from vitshrink.compress import class_token_layers
    from vitshrink.methods.glad import Glad

    x = held_out()
    after = {}
    for weight in (0.0, 20.0):
        teacher, student = teacher_student(seed=3, noise=0.0)
        glad = Glad()
        glad.apply(student, glad.resolve(student, {"layers": [1], "tokens": [4]}, None), None)  # 16 -> 4 patches
        layers, prefix = class_token_layers(student, [])
        assert (layers, prefix) == ([0, 1], 1)
        before = block_mse(student, teacher, x, 1, tokens=1)
        config = FinetuneConfig(steps=12, lr=1e-3, batch_size=8, class_token_weight=weight)
        distill(student, teacher, random_set(), config, prefix_layers=layers, num_prefix_tokens=prefix, progress=False)
        after[weight] = block_mse(student, teacher, x, 1, tokens=1)
        assert not student.blocks[1]._forward_hooks and not teacher.blocks[1]._forward_hooks
    # logits alone let the class token drift far (x60 here); the per-block term keeps it near the teacher's
    assert after[20.0] < before and after[20.0] < 0.1 * after[0.0], (before, after)
    with pytest.raises(VitshrinkError, match="class_token_weight"):
        FinetuneConfig(class_token_weight=-1).validate()


def test_steps_zero_leaves_student_untouched() -> None:
    teacher, student = teacher_student()
    before = snapshot(student)
    result = distill(student, teacher, random_set(8), FinetuneConfig(steps=0), progress=False)
    assert result.steps_done == 0 and result.losses == [] and result.final_loss is None
    assert result.student is student and same(before, snapshot(student))


def test_grad_accum_counts_optimizer_steps() -> None:
    teacher, student = teacher_student()
    config = FinetuneConfig(steps=3, lr=1e-3, batch_size=4, grad_accum=2)
    result = distill(student, teacher, random_set(12), config, progress=False)
    assert result.steps_done == 3 and len(result.losses) == 3


def test_resume_continues_from_saved_step(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = FinetuneConfig(steps=10, lr=1e-3, batch_size=4, save_every=5, warmup_steps=2)
    teacher, student = teacher_student()
    initial = snapshot(student)
    # 16 images, batch 4: reading more than 28 items stops the run during step 8 (saved at 5).
    with pytest.raises(Interrupted):
        distill(
            student, teacher, Interrupting(random_set(16), limit=28), config, state_dir=state, progress=False
        )
    meta = json.loads((state / "checkpoint" / "vitshrink_finetune.json").read_text())
    assert meta["step"] == 5 and meta["config"]["lr"] == 1e-3
    assert not (state / "checkpoint.tmp").exists() and not (state / "checkpoint.old").exists()

    fresh = tiny_vit()
    fresh.load_state_dict(initial)
    result = distill(fresh, teacher, random_set(16), config, state_dir=state, resume=True, progress=False)
    assert result.resumed_from == 5 and result.steps_done == 10 and len(result.losses) == 5
    expected = [1e-3 * _lr_factor(i, 10, 2) for i in range(5, 10)]
    assert result.lrs == pytest.approx(expected)
    assert json.loads((state / "checkpoint" / "vitshrink_finetune.json").read_text())["step"] == 10

    # Resuming a finished state loads its weights and runs no step.
    again = tiny_vit()
    again.load_state_dict(initial)
    done = distill(again, teacher, random_set(16), config, state_dir=state, resume=True, progress=False)
    assert done.resumed_from == 10 and done.steps_done == 10 and done.losses == []
    assert same(snapshot(again), snapshot(fresh))

    with pytest.raises(VitshrinkError, match="lr"):
        distill(fresh, teacher, random_set(16), FinetuneConfig(**{**config.__dict__, "lr": 2e-3}),
                state_dir=state, resume=True, progress=False)  # fmt: skip
    with pytest.raises(VitshrinkError, match="batch_size"):
        distill(fresh, teacher, random_set(16), FinetuneConfig(**{**config.__dict__, "batch_size": 8}),
                state_dir=state, resume=True, progress=False)  # fmt: skip


def test_resume_without_state_is_a_clear_error(tmp_path: Path) -> None:
    teacher, student = teacher_student()
    config = FinetuneConfig(steps=4, batch_size=4)
    with pytest.raises(VitshrinkError, match="no saved fine-tune state"):
        distill(student, teacher, random_set(8), config, state_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(VitshrinkError, match="state_dir"):
        distill(student, teacher, random_set(8), config, resume=True, progress=False)


def test_bad_config_and_inputs() -> None:
    teacher, student = teacher_student()
    for bad in ({"mixed_precision": "fp8"}, {"steps": -1}, {"lr": 0.0}, {"batch_size": 0}, {"grad_accum": 0}):
        with pytest.raises(VitshrinkError):
            distill(student, teacher, random_set(8), FinetuneConfig(**bad), progress=False)  # type: ignore[arg-type]
    with pytest.raises(VitshrinkError, match="empty"):
        distill(student, teacher, random_set(0), FinetuneConfig(steps=2), progress=False)
    with pytest.raises(VitshrinkError, match="same module"):
        distill(student, student, random_set(8), FinetuneConfig(steps=2), progress=False)


def test_mixed_precision_auto_is_no_on_cpu() -> None:
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    assert resolve_mixed_precision("bf16", cpu=True) == "bf16"
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"


def test_param_groups_skip_decay_on_norms_biases_and_embeddings() -> None:
    model = tiny_vit()
    groups = _param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    assert not decay & no_decay


@pytest.mark.slow
def test_two_cpu_processes_with_accelerate_launch(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / "tests" / "scripts" / "distill_mp.py"), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    assert [r["steps_done"] for r in ranks] == [6, 6]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # identical students on every process
    assert ranks[0]["losses"] == ranks[1]["losses"]

    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["student.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "student.safetensors"))
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
        depth=2, num_heads=3, num_classes=10,
    ).state_dict()  # fmt: skip
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    meta = json.loads((tmp_path / "state" / "checkpoint" / "vitshrink_finetune.json").read_text())
    assert meta["step"] == 6 and meta["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["checkpoint"]
