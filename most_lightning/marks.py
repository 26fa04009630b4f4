"""Conventions the data, the model and the losses share, defined once.

Every position of a batch carries a modality mark (0 text, 1 audio; docs/model_spec.md section 2.4), and
labels that must not be predicted (prompts, padding, spliced audio frames) hold ``IGNORE_INDEX``.
"""

TEXT, AUDIO = 0, 1
MODALITY_NAMES = ("text", "audio")  # indexed by the mark
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
