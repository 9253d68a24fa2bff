"""Codecs: every compressor of the four papers as a real bitstream (see docs/codecs.md)."""
from .base import Codec, CodecError, Payload  # noqa: F401
from . import identity  # noqa: F401
from . import qsgd, qsgd_ans, sign, sparse, stochastic_bits  # noqa: F401
