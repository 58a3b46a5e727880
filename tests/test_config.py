import pytest

from dtfast.train.config import ConfigError, PretrainConfig, help_text, load_config


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg == PretrainConfig()
    assert cfg.data.root == "" and cfg.teacher.pretrained == ""


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("train:\n  lr: 0.004\n  batch_size: 8\nteacher:\n  timestep: 50\n")
    cfg = load_config(str(path), ["train.batch_size=3", "teacher.strides=[8,16]", "loss.at_mode=code", "out=x"])
    assert cfg.train.lr == 0.004 and cfg.train.batch_size == 3 and cfg.teacher.timestep == 50
    assert cfg.teacher.strides == [8, 16] and cfg.loss.at_mode == "code" and cfg.out == "x"


@pytest.mark.parametrize("override, words", [
    (["train.lrr=1"], ["train.lrr", "train.lr"]),
    (["loss.whiten=foo"], ["loss.whiten", "channel"]),
    (["train.batch_size=abc"], ["train.batch_size", "int"]),
    (["train.batch_size=0"], ["train.batch_size", "> 0"]),
    (["teacher.strides=[16,8]"], ["teacher.strides", "ascending"]),
    (["teacher.compile_mode=fast"], ["teacher.compile_mode", "max-autotune-no-cudagraphs"]),
    (["train=3"], ["train", "section"]),
    (["train.min_lr=-1e-4"], ["train.min_lr", ">= 0"]),
    (["train.warmup_steps=-5"], ["train.warmup_steps", ">= 0"]),
    (["train.weight_decay=-0.05"], ["train.weight_decay", ">= 0"]),
    (["train.save_every=-10"], ["train.save_every", ">= 0"]),
    (["train.keep_last=0"], ["train.keep_last", ">= 1"]),
    (["train.min_lr=1", "train.lr=0.1"], ["train.min_lr", "above", "train.lr"]),
    (["train.betas=[0.9,1.5]"], ["train.betas", "[0, 1)"]),
    (["nodot"], ["key.sub=value"]),
    (["train.epochs=3"], ["train.max_steps", "train.epochs", "both", "train.epochs=0"]),
    (["train.warmup_epochs=1"], ["train.warmup_steps", "train.warmup_epochs", "both"]),
    (["train.max_steps=0"], ["no length", "train.max_steps", "train.epochs"]),
    (["train.epochs=-1", "train.max_steps=0"], ["train.epochs", ">= 0"]),
    (["data.num_threads=-1"], ["data.num_threads", ">= 0"]),
    (["data.hw_decoder_load=1.5"], ["data.hw_decoder_load", "[0, 1]"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for word in words:
        assert word in str(err.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("student:\n  archh: resnet50\n")
    with pytest.raises(ConfigError, match="student.archh"):
        load_config(str(unknown))


def test_help_lists_every_field():
    import dataclasses

    text = help_text()
    cfg = PretrainConfig()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                assert f"{section.name}.{f.name}" in text
        else:
            assert section.name in text


def test_text_keys_take_the_override_text_as_written():
    # YAML parsing turned "a #b" into "a", "1.10" into "1.1" and a date-like name into an error
    cfg = load_config(None, ["data.root=/data/set #2", "out=runs/v1.10", "teacher.pretrained=1.10",
                             "train.resume=never"])
    assert cfg.data.root == "/data/set #2" and cfg.out == "runs/v1.10" and cfg.teacher.pretrained == "1.10"
    assert load_config(None, ["out=2024-06-01"]).out == "2024-06-01"
    assert load_config(None, ["out=runs/exp: a"]).out == "runs/exp: a"
    assert load_config(None, ["teacher.pretrained="]).teacher.pretrained == ""
    # other types still parse
    cfg = load_config(None, ["train.betas=[0.9,0.95]", "teacher.strides=4,8,16,32", "train.lr=1e-3"])
    assert cfg.train.betas == [0.9, 0.95] and cfg.teacher.strides == [4, 8, 16, 32] and cfg.train.lr == 1e-3


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="'train.lr' must be a finite number"):
        load_config(None, [f"train.lr={value}"])


def test_non_square_crops_are_height_and_width():
    assert load_config(None, ["data.image_size=48"]).data.crop_hw == (48, 48)
    assert load_config(None, ["data.image_size=128", "data.image_width=256"]).data.crop_hw == (128, 256)
    square = load_config(None, ["data.image_size=48", "data.image_width=48"]).data  # stored as square: resumes match
    assert (square.image_width, square.crop_hw) == (0, (48, 48))
    with pytest.raises(ConfigError, match="'data.image_width' must be finite and >= 0"):
        load_config(None, ["data.image_width=-1"])


def test_batch_size_below_two_is_refused_naming_the_key():
    # the regressor's pooling BatchNorm (1x1 map) cannot train on one image: name the key before building anything
    with pytest.raises(ConfigError, match="'train.batch_size' must be >= 2"):
        load_config(None, ["train.batch_size=1"])


def test_a_warmup_longer_than_the_run_warns_naming_both_keys_in_either_unit():
    from dtfast.train.config import schedule_steps

    cfg = load_config(None, ["train.max_steps=4"])
    with pytest.warns(UserWarning, match="'train.warmup_steps' = 10 is longer than the run .'train.max_steps' = 4"):
        assert schedule_steps(cfg, 1000, 1) == (4, 10)
    # mixed units: 0.05 epochs of 1000 images at batch 16 = 3 steps, a warm-up of 40 steps
    cfg = load_config(None, ["train.max_steps=0", "train.epochs=0.05", "train.warmup_steps=40"])
    with pytest.warns(UserWarning, match=r"'train.warmup_steps' = 40 is longer .*'train.epochs' = 0.05 \(3 steps\)"):
        assert schedule_steps(cfg, 1000, 1) == (3, 40)
    cfg = load_config(None, ["train.max_steps=0", "train.epochs=2", "train.warmup_steps=0", "train.warmup_epochs=3"])
    with pytest.warns(UserWarning, match=r"'train.warmup_epochs' = 3 \(186 steps\) .*'train.epochs' = 2 \(124 steps\)"):
        assert schedule_steps(cfg, 1000, 1) == (124, 186)


@pytest.mark.parametrize("preset, images, world, steps, warmup", [
    # 200 (30) epochs; each rank reads 1281167 // 8 = 160145 images in 625 whole batches of 256 per epoch
    ("imagenet_r50_adm256", 1281167, 8, 125000, 18750),
    ("imagenet_r50_adm256", 1281167, 4, 250200, 37530),    # 4 GPUs: 320291 // 256 = 1251 batches per epoch
    ("imagenet_convnextb_adm256", 1281167, 8, 125100, 18765),  # 1251 micro-batches of 128, 2 per step
    ("lsun_r50_adm256", 3033042, 8, 1184700, 236940),      # LSUN bedroom, 100 (20) epochs of 11847 batches of 32
    ("lsun_r50_adm256", 70000, 8, 27300, 5460),            # FFHQ: 273 batches per epoch
    ("bdd100k_r50_adm", 70000, 8, 163800, 8190),           # BDD100K train: 600 (30) epochs of 273 batches of 32
])
def test_presets_count_the_recipes_epochs_in_steps_of_their_global_batch(preset, images, world, steps, warmup):
    import os

    from dtfast.train.config import schedule_steps

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", f"{preset}.yaml"))
    assert schedule_steps(cfg, images, world) == (steps, warmup)
    assert cfg.train.optimizer != "lamb" or cfg.train.grad_clip == 1.0  # apex's and timm's LAMB default


def test_steps_override_epochs_only_when_epochs_are_off():
    from dtfast.train.config import schedule_steps

    cfg = load_config(None, ["train.max_steps=7", "train.warmup_steps=2"])
    assert schedule_steps(cfg, 1000, 10) == (7, 2)
    cfg = load_config(None, ["train.max_steps=0", "train.epochs=0.5", "train.warmup_steps=0",
                             "train.warmup_epochs=0.01", "train.batch_size=10"])
    assert schedule_steps(cfg, 1000, 1) == (50, 1)  # 100 batches per epoch
    assert schedule_steps(cfg, 1009, 1) == (50, 1)  # the partial batch is dropped
    assert schedule_steps(cfg, 1050, 1) == (53, 1)  # 52.5 rounds up
    assert schedule_steps(cfg, 30, 1) == (2, 1)  # at least one step
