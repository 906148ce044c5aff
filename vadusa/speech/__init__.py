"""Embedded demo TTS: espeak-ng corpus, unit codec + Griffin-Lim vocoder, CTC judge, a tiny codec LM.

from vadusa.speech import TTSPipeline
pipe = TTSPipeline.from_pretrained()            # shipped weights in vadusa/assets/demo
wav, sample_rate, out = pipe.synthesize("Hello there.", seed=0)
"""

from .codec import UnitCodec
from .judge import Judge, cer, edit_distance
from .pipeline import TTSPipeline

__all__ = ["TTSPipeline", "UnitCodec", "Judge", "cer", "edit_distance"]
