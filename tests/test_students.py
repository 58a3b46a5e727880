"""Student (timm backbone + UPerNet-like regressor): shapes, timm export/load, shape-mismatch errors."""

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from dtfast.students import UPerRegressor, build_student, check_feature_shapes

TEACHER_CHANNELS = (24, 40, 56, 72)  # odd-ish, unlike any backbone's own channels


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "convnext_tiny"])
def test_output_shapes_and_every_parameter_trains(arch):
    torch.manual_seed(0)
    student = build_student(arch, TEACHER_CHANNELS, width=32)
    x = torch.randn(2, 3, 64, 64)
    outputs = student(x)
    shapes = [tuple(o.shape) for o in outputs]
    assert shapes == [(2, c, 64 // s, 64 // s) for c, s in zip(TEACHER_CHANNELS, (4, 8, 16, 32))]
    assert student.feature_shapes(64, 64) == [s[1:] for s in shapes]
    assert len(student.backbone_channels) == 4 and student.strides == (4, 8, 16, 32)
    assert len(student.mean) == 3 and len(student.std) == 3 and all(s > 0 for s in student.std)
    # DDP without find_unused_parameters needs every trainable parameter in the graph.
    sum(o.float().square().mean() for o in outputs).backward()
    unused = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_feature_shapes_follow_the_backbone_rounding():
    student = build_student("resnet18", TEACHER_CHANNELS, width=16)
    predicted = student.feature_shapes(70, 66)
    with torch.no_grad():
        actual = [tuple(o.shape[1:]) for o in student.eval()(torch.randn(1, 3, 70, 66))]
    assert predicted == actual
    assert predicted[0][1:] == (18, 17)  # resnet rounds up at each stride-2 step


def _perturb(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_backbone_export_loads_into_timm(arch, tmp_path):
    student = build_student(arch, TEACHER_CHANNELS, width=16)
    _perturb(student.backbone)  # stand-in for training: weights differ from any fresh init
    exported = student.backbone_state_dict()
    path = tmp_path / "backbone.safetensors"
    safetensors_torch.save_file(exported, str(path))

    loaded = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    reference = loaded.state_dict()
    # timm loads non-strictly when num_classes differs from the checkpoint's, so check strictly here.
    assert list(reference) == list(exported)
    for key, value in reference.items():
        assert value.shape == exported[key].shape, key
        assert torch.equal(value, exported[key]), key
    fresh = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    first_conv = next(k for k in fresh if k.endswith("weight") and fresh[k].dim() == 4)
    assert not torch.equal(fresh[first_conv], reference[first_conv])

    # The loaded timm model computes the same pyramid as the student's backbone.
    x = torch.randn(2, 3, 64, 64)
    student.eval()
    loaded.eval()
    with torch.no_grad():
        ours = student.forward_backbone(x)
        theirs = loaded.forward_intermediates(x, indices=list(student.feature_indices), intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_pruned_head_parts_keep_their_initial_values():
    torch.manual_seed(3)
    student = build_student("convnext_tiny", TEACHER_CHANNELS, width=16)
    assert not any(name.startswith("head") for name, _ in student.backbone.named_parameters())
    exported = student.backbone_state_dict()
    torch.testing.assert_close(exported["head.norm.weight"], torch.ones(768))
    torch.testing.assert_close(exported["head.norm.bias"], torch.zeros(768))


def test_mismatch_error_names_level_stride_and_shapes():
    student = build_student("resnet18", TEACHER_CHANNELS, width=16)
    student_shapes = student.feature_shapes(64, 64)
    teacher_shapes = list(student_shapes)
    teacher_shapes[2] = (1024, 4, 4)
    with pytest.raises(ValueError) as info:
        check_feature_shapes(student_shapes, teacher_shapes)
    message = str(info.value)
    assert "level 2 (stride 16)" in message
    assert "(56, 4, 4)" in message and "(1024, 4, 4)" in message
    assert "level 0" not in message and "level 3" not in message

    # a different input size: every level differs and is named
    with pytest.raises(ValueError, match=r"level 3 \(stride 32\): student \(72, 2, 2\) vs teacher \(72, 3, 3\)"):
        check_feature_shapes(student_shapes, [(c, h + 1, w + 1) for c, h, w in student_shapes])
    with pytest.raises(ValueError, match="3 feature levels"):
        check_feature_shapes(student_shapes[:3], student_shapes)
    check_feature_shapes(student_shapes, list(student_shapes))  # equal: no error
    batched = [(2, *s) for s in student_shapes]
    check_feature_shapes(batched, batched)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="not a timm model"):
        build_student("no_such_net", TEACHER_CHANNELS)
    with pytest.raises(ValueError, match="did you mean .*convnext_base"):
        build_student("convnext_bse", TEACHER_CHANNELS)
    with pytest.raises(ValueError, match="no feature map at stride 64"):
        build_student("resnet18", (8, 8, 8, 8, 8), strides=(4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match="4 strides"):
        build_student("resnet18", (8, 8, 8))
    student = build_student("resnet18", TEACHER_CHANNELS, width=16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        student(torch.randn(2, 1, 64, 64))


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    student = build_student("resnet18", TEACHER_CHANNELS, width=16).eval()
    torch.manual_seed(0)
    student_cl = build_student("resnet18", TEACHER_CHANNELS, width=16, channels_last=True).eval()
    assert student_cl.regressor.heads[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(student(x), student_cl(x.contiguous(memory_format=torch.channels_last))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_regressor_top_down_path():
    """R2 sees C5 through the top-down path (and the PPM); R5 never sees the finer maps."""
    torch.manual_seed(0)
    regressor = UPerRegressor((8, 12, 16, 20), (5, 6, 7, 9), width=8).eval()
    features = [torch.randn(2, c, 2 ** (5 - i), 2 ** (5 - i), requires_grad=True)
                for i, c in enumerate((8, 12, 16, 20))]
    outputs = regressor(features)
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 32, 32), (2, 6, 16, 16), (2, 7, 8, 8), (2, 9, 4, 4)]
    (grad_c5_from_r2,) = torch.autograd.grad(outputs[0].sum(), features[3], retain_graph=True)
    assert grad_c5_from_r2.abs().sum() > 0
    grad_c2_from_r5 = torch.autograd.grad(outputs[3].sum(), features[0], allow_unused=True)[0]
    assert grad_c2_from_r5 is None
    with pytest.raises(ValueError, match=r"level 1 expects \(B, 12, H, W\)"):
        regressor([features[0], features[0], features[2], features[3]])


def test_pretrained_from_a_file_restores_the_backbone(tmp_path):
    student = build_student("resnet18", TEACHER_CHANNELS, width=16)
    _perturb(student.backbone)
    path = tmp_path / "backbone.safetensors"
    safetensors_torch.save_file(student.backbone_state_dict(), str(path))
    restored = build_student("resnet18", TEACHER_CHANNELS, width=16, pretrained=str(path))
    for key, value in student.backbone_state_dict().items():
        assert torch.equal(value, restored.backbone_state_dict()[key]), key


def test_valid_padding_mismatch_names_the_arch():
    # Inception-style backbones round their maps (valid padding) even at a multiple of the largest stride: the
    # message must name the arch, not send the user to the image size
    teacher = [(32, 32, 32), (32, 16, 16), (64, 8, 8), (64, 4, 4)]
    student = [(32, 28, 28), (32, 13, 13), (64, 6, 6), (64, 2, 2)]
    with pytest.raises(ValueError, match=r"student.arch=inception_v3 does not give maps of exactly 128 / stride"):
        check_feature_shapes(student, teacher, strides=(4, 8, 16, 32), arch="inception_v3", image_size=128)
    with pytest.raises(ValueError, match="Check the image size"):  # not a multiple of 32: the size is the suspect
        check_feature_shapes(student, teacher, strides=(4, 8, 16, 32), arch="resnet18", image_size=100)


def test_fixed_input_size_backbone_is_a_clear_error(tmp_path, capsys):
    # Swin-like students build, then fail on an input of another size deep inside timm; the trainer names the arch,
    # and the command line says it in one line (exit code 2)
    from dtfast.pretrain import main

    assert main([f"out={tmp_path}", "data.image_size=32", "data.num_images=16", "data.num_workers=0",
                 "student.arch=swin_tiny_patch4_window7_224", "train.max_steps=1", "dist.engine=ddp"]) == 2
    err = capsys.readouterr().err
    assert "student.arch=swin_tiny_patch4_window7_224 cannot run a 32x32 input" in err and "Traceback" not in err
