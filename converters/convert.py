"""`flashlm convert`: pick the source reader for a path and write the model folder."""
from __future__ import annotations

from pathlib import Path

from .source import SUPPORTED_SOURCES, ConversionError, Source
from .writer import write_model


def open_source(path) -> Source:
    """A GGUF file or a Hugging Face folder (config.json + *.safetensors) as a Source."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from .gguf_source import GGUFSource
            return GGUFSource(path)
        raise ConversionError(f"{path}: not a GGUF file (magic {magic!r}); supported: " + "; ".join(SUPPORTED_SOURCES))
    if (path / "config.json").exists():
        from .hf_source import HFSource
        return HFSource(path)
    raise ConversionError(f"{path}: a folder without config.json; supported: " + "; ".join(SUPPORTED_SOURCES))


def convert(src, out_dir, *, dtype: str = "auto", bundle_dtype: str | None = None, resident: tuple = (),
            force: bool = False, progress: bool = True, tie_embeddings: bool = False) -> Path:
    """Convert a checkpoint into a flashlm model folder; returns its path. tie_embeddings: drop the
    source's lm_head and use the token embeddings for it (converters/source.py TiedEmbeddings)."""
    source = open_source(src)
    if tie_embeddings and not source.config.tied_embeddings:
        from .source import TiedEmbeddings
        source = TiedEmbeddings(source)
    try:
        return write_model(source, out_dir, dtype=dtype, bundle_dtype=bundle_dtype, resident=resident,
                           force=force, progress=progress)
    finally:
        source.close()


def plan(src) -> dict:
    """What a conversion would produce, without writing anything (for --dry-run)."""
    source = open_source(src)
    try:
        return {"config": source.config.to_dict(), "source": source.info.description}
    finally:
        source.close()

