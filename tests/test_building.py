"""Model building: casts keep diffusers' float32 modules and log nothing; diffusers' empty-list float32
warning (8 identical lines at a 2-worker cpu-tiny serve's start) is gone at its cause, and the copy that
diffusers' own SDXL decode logs is filtered, exactly that message."""

from __future__ import annotations

import logging

import pytest

from backends import building


def test_cast_dtype_keeps_the_float32_modules_a_model_names(torch_one_thread):
    torch = torch_one_thread

    class Model(torch.nn.Module):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)
            self.norm = torch.nn.LayerNorm(2)
            self.block = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(2), "normal": torch.nn.Linear(2, 2)})
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("steps", torch.arange(3))

    model = Model()
    before = model.proj.weight.detach().clone()
    assert building.cast_dtype(model, torch.float16) is model
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes == {
        "proj.weight": torch.float16, "proj.bias": torch.float16,
        "norm.weight": torch.float32, "norm.bias": torch.float32,
        "block.norm.weight": torch.float32, "block.norm.bias": torch.float32,
        "block.normal.weight": torch.float16, "block.normal.bias": torch.float16,  # 'normal' is not 'norm'
        "scale": torch.float16, "steps": torch.int64,
    }
    assert torch.equal(model.proj.weight, before.half())
    assert isinstance(model.proj.weight, torch.nn.Parameter)


def test_building_a_cast_pipeline_logs_no_float32_warning(torch_one_thread, monkeypatch, capfd):
    from backends.pipelines import build_pipeline
    from backends.specs import get_spec

    logger = logging.getLogger(building.DIFFUSERS_MODEL_LOGGER)
    monkeypatch.setattr(logger, "filters", [])  # the casts must not log it: no filter to hide it
    monkeypatch.setattr(building, "_filter_empty_fp32_warning", lambda: None)
    pipe = build_pipeline(get_spec("sd-turbo", "tiny"), dtype="fp16")
    assert pipe.unet.dtype == torch_one_thread.float16 and pipe.vae.dtype == torch_one_thread.float16
    assert "should be kept in float32" not in capfd.readouterr().err


class Collect(logging.Handler):
    """Keeps the messages of the records that reach the logger's handlers."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("modules,shown", [("[]", False), ("['norm']", True)])
def test_diffusers_empty_float32_warning_is_filtered_once(modules, shown, monkeypatch):
    import diffusers  # noqa: F401 - sets up diffusers' logger and its handler

    logger = logging.getLogger(building.DIFFUSERS_MODEL_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    building.import_model_libraries()
    building.import_model_libraries()
    assert sum(isinstance(f, building.EmptyFp32ListFilter) for f in logger.filters) == 1
    # A handler of our own, not the captured stderr: diffusers' handler writes to the stream it was made
    # with, which under pytest may be an earlier test's capture. A logger's filters act before any handler.
    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning(f"There are modules in AutoencoderKL that should be kept in float32: {modules}. Casting "
                       "directly with `to()` can lead to inconsistent results; set `torch_dtype` ...")
        logger.warning("another diffusers warning")
    finally:
        logger.removeHandler(collect)
    assert any("should be kept in float32" in m for m in collect.messages) is shown
    assert "another diffusers warning" in collect.messages
