"""Regenerate tests/data/tiny-bundle (needs the [export] extra): python tests/make_test_bundle.py"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from export.build import BuildOptions, Progress, build_bundle  # noqa: E402
from export.quantize import QuantRecipe  # noqa: E402
from export.tiny import make_tiny_llama  # noqa: E402

out = Path(__file__).parent / "data" / "tiny-bundle"
shutil.rmtree(out, ignore_errors=True)
with tempfile.TemporaryDirectory() as tmp:
    src = make_tiny_llama(Path(tmp) / "tiny")
    build_bundle(str(src), out, BuildOptions(quant=QuantRecipe("fp32"), lora_rank=4, train_batch=4, train_seq=32), log=Progress())
