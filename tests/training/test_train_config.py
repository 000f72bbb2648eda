"""The trainer config on the shared config base (curation/config_base.py): the same ConfigError,
the same one-line errors for a config file that cannot be read, the same overrides (list indices included), and
the augmentation settings defined once (``AugmentConfig`` is the ``crops`` section plus the fixed recipe parts)."""
import pytest

from lvd_train_testutils import REPO

from curation.config import ConfigError as CurationConfigError
from training.augment import AugmentConfig, MultiCropAugmentation
from training.config import CropsConfig, load_config
from training.train import build_stream

DEMO = REPO / "pipelines" / "configs" / "train_demo.yaml"


def _one_line_error(*args, **kwargs) -> str:
    with pytest.raises(CurationConfigError) as info:  # one error type for every command
        load_config(*args, **kwargs)
    text = str(info.value)
    assert text.startswith("config error: ") and "\n" not in text, text
    return text


def test_unreadable_config_files_fail_in_one_line(tmp_path):
    assert "config file not found" in _one_line_error(tmp_path / "nope.yaml")
    assert "is not a file" in _one_line_error(tmp_path)
    binary = tmp_path / "model.pth"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "is not a text file" in _one_line_error(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {base_lr: [1,\n")
    assert "is not valid YAML" in _one_line_error(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- optim\n- model\n")
    assert "the top level must be a mapping" in _one_line_error(listed)
    assert "optim.base_lrr: unknown key" in _one_line_error(DEMO, ["optim.base_lrr=1"])


def test_overrides_index_lists_as_curation_does():
    raw = {"optim": {"betas": [0.9, 0.999]}}
    cfg = load_config(raw=raw, overrides=["optim.betas.1=0.95", "optim.base_lr=1e-3"])
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.base_lr == 1e-3
    assert raw == {"optim": {"betas": [0.9, 0.999]}}  # the caller's data is not altered
    assert "optim.betas is a list of 2, '2' is not an index of it" in _one_line_error(
        raw=raw, overrides=["optim.betas.2=0.5"])
    assert "must look like key.path=value" in _one_line_error(raw=raw, overrides=["optim.base_lr"])


def test_augment_config_is_the_crops_section():
    crops = CropsConfig()
    aug = AugmentConfig()
    for name in CropsConfig.model_fields:  # same fields, same defaults: one definition
        assert getattr(aug, name) == getattr(crops, name), name
    with pytest.raises(ValueError, match="local_crops_scale"):  # and the same validation
        AugmentConfig(local_crops_scale=(0.5, 0.1))
    cfg = load_config(DEMO, ["crops.flip_p=0.25", "crops.hue=0.05", "crops.blur_p=[0.5, 0.2, 0.3]"])
    stream = build_stream(cfg, [])
    assert isinstance(stream.augment, MultiCropAugmentation)
    assert stream.augment.cfg.model_dump(include=set(CropsConfig.model_fields)) == cfg.crops.model_dump()
