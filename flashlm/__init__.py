"""flashlm: on-device LLM inference that streams sparse FFN neurons from flash ("LLM in a flash").

The installed packages are `flashlm.runtime` (loading and running a converted model folder) and
`flashlm.converters` (GGUF / Hugging Face checkpoints -> model folder); their sources live in the
project's top-level `runtime/` and `converters/` folders (see pyproject.toml's package-dir).
"""
__version__ = "0.1.0"
