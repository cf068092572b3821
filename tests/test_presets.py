"""Presets say only what is theirs: the paper's data sets name their data and take the
recipe from one base (``_paper.yaml``), and a file of the user's may build on any preset."""
import pytest
import yaml

from agkd_models.config import CONFIG_DIR, PRESETS, ConfigError, load_config


def test_the_base_is_not_a_preset_and_every_paper_preset_builds_on_it():
    assert "_paper" not in PRESETS
    paper = [p for p in PRESETS if p != "digits"]
    assert len(paper) == 9
    base = yaml.safe_load((CONFIG_DIR / "_paper.yaml").read_text())
    for name in paper:
        own = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        assert own.pop("base") == "_paper", name
        for section, entries in own.items():  # nothing repeated from the base
            for key, value in entries.items():
                assert base.get(section, {}).get(key) != value, (name, section, key)
        cfg = load_config(name)
        assert (cfg.train.lr, cfg.train.batch_size, cfg.data.image_size, cfg.teacher.vit) == \
               (0.01, 128, 224, "vit_base_patch16_224")


def test_a_users_file_builds_on_a_preset_and_overrides_one_key(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("base: digits\ntrain:\n  lr: 0.005\n")
    cfg, digits = load_config(str(own)), load_config("digits")
    assert cfg.train.lr == 0.005 and cfg.train.epochs == digits.train.epochs and cfg.data == digits.data


@pytest.mark.parametrize("text, words", [("base: nowhere\n", "no preset or file"),
                                         ("base: [1]\n", "must name a preset"),
                                         ("base: loop.yaml\n", "leads back to itself")])
def test_a_bad_base_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(str(path))
