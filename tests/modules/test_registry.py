"""Finding modules: by key, by entry point (a real pip-installed plugin), by dotted path, by config."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vlgrpo.modules import VLMModule, available_modules, get_module, infer_module_key
from vlgrpo.modules.internvl import InternVLModule
from vlgrpo.modules.qwen import QwenModule


def test_builtin_keys():
    assert isinstance(get_module("qwen"), QwenModule)
    assert isinstance(get_module("internvl"), InternVLModule)
    assert get_module("qwen") is not get_module("qwen"), "instances must not be shared (no global state)"
    assert get_module("internvl").get_non_generate_params() == ["image_flags"]
    assert get_module("qwen").get_custom_multimodal_keywords()[:2] == ["pixel_values", "image_grid_thw"]


def test_unknown_key_lists_known_keys():
    with pytest.raises(ValueError) as e:
        get_module("llava-next")
    assert "qwen" in str(e.value) and "internvl" in str(e.value) and "llava-next" in str(e.value)


def test_dotted_path():
    m = get_module("vlgrpo.modules.qwen:QwenModule")
    assert isinstance(m, QwenModule)
    with pytest.raises(ValueError, match="cannot load"):
        get_module("vlgrpo.modules.qwen:Nope")
    with pytest.raises(TypeError, match="not a subclass"):
        get_module("collections:OrderedDict")


PLUGIN = '''
from vlgrpo.modules.qwen import QwenModule

class MyModule(QwenModule):
    model_types = ("my_vlm",)

    def get_vlm_key(self):
        return "my-vlm"
'''


def test_entry_point_plugin(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "my_vlm_plugin").mkdir(parents=True)
    (src / "my_vlm_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "my-vlm-plugin"
        version = "0.0.1"
        [project.entry-points."vlgrpo.modules"]
        my-vlm = "my_vlm_plugin:MyModule"
        [tool.setuptools]
        packages = ["my_vlm_plugin"]
    '''))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    monkeypatch.syspath_prepend(str(target))
    m = get_module("my-vlm")
    assert m.get_vlm_key() == "my-vlm" and isinstance(m, VLMModule)
    assert "my-vlm" in available_modules()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "my_vlm"}')
    assert infer_module_key(str(tmp_path / "ckpt")) == "my-vlm"


def test_infer_from_config(tiny_model_factory):
    assert infer_module_key(str(tiny_model_factory("qwen2-vl"))) == "qwen"
    assert infer_module_key(str(tiny_model_factory("internvl"))) == "internvl"


def test_infer_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model.module"):
        infer_module_key(str(tmp_path))


def test_processing_kwargs(tiny_model_factory):
    from vlgrpo.modules.loading import load_processor

    q = get_module("qwen")
    proc = load_processor(str(tiny_model_factory("qwen2-vl")), q, {"max_pixels": 28 * 28 * 4})
    assert proc.image_processor.max_pixels == 28 * 28 * 4
    with pytest.raises(ValueError, match="max_anyres_num"):
        q.apply_processing_kwargs(proc, {"max_anyres_num": 2})
    i = get_module("internvl")
    proc = load_processor(str(tiny_model_factory("internvl")), i, {"max_anyres_num": 2})
    assert proc.image_processor.max_patches == 2
